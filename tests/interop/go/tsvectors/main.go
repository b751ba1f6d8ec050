// Command tsvectors runs Tailscale's own Go packages (tailscale.com v1.102.5) against embedmesh's
// Python cores in tests/tailscale/, so the Python code is checked against the real implementation
// and not only against itself.
//
// Modes (the first argument):
//
//	noise-server   controlbase.Server over stdin/stdout: the initiation arrives in the stream,
//	               an early payload (EarlyNoise JSON, as headscale writes it) follows the
//	               response, then every message is echoed back.
//	noise-client   controlbase.Client over stdin/stdout, wrapped in ts2021.Conn: reads the early
//	               payload the Python server sent, then sends messages and checks their echoes.
//	http-server    an HTTP server on 127.0.0.1 (port printed on stdout) serving GET /key?v= and
//	               POST /ts2021 with controlhttpserver.AcceptHTTP, then the echo loop.
//	http-client    controlhttp.Dialer against a Python HTTP server, then as noise-client.
//	h2-server      as http-server, but serves HTTP/2 inside the Noise conn with
//	               golang.org/x/net/http2 (as headscale and Tailscale's control do): the
//	               routes /whoami, /echo, /stream, /progress and /reset (see h2Routes).
//	ts2021-client  Tailscale's own control client transport (ts2021.Client: controlhttp.Dialer,
//	               ts2021.Conn, net/http's HTTP/2) against a Python server serving those routes:
//	               a big echo, a multi-MB stream and concurrent echoes; JSON report on stdout.
//	disco          JSON on stdin: seals disco messages with types/key and disco, opens and parses
//	               packets sealed by Python, formats keys as text; JSON on stdout.
//	zstd           JSON on stdin: encodes map bodies with util/zstdframe (as tailscale's servers
//	               do, default and fastest levels) and decodes frames as controlclient does.
//	derp-client    derphttp.Client (as magicsock uses it) connected to the DERP server URL in the
//	               second argument. Prints {"event":"ready","key":...,"server":...}, then one JSON
//	               line per received message (packet, peergone, serverinfo, ping, health,
//	               restarting, error). Reads commands from stdin, one a line: "send <nodekey:..>
//	               <hex>", "ping" (a round trip: {"event":"pong"}), "preferred", "close".
//
// Messages inside the Noise stream are framed as [u32 BE length][payload]; length 0xFFFFFFFF ends
// the exchange. Reports go to stdout as one JSON object per line; errors exit non-zero.
package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go4.org/mem"
	"golang.org/x/net/http2"
	"tailscale.com/control/controlbase"
	"tailscale.com/control/controlhttp"
	"tailscale.com/control/controlhttp/controlhttpserver"
	"tailscale.com/control/ts2021"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/disco"
	"tailscale.com/health"
	"tailscale.com/net/netmon"
	"tailscale.com/net/tsdial"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/util/eventbus"
	"tailscale.com/util/zstdframe"
)

const endOfExchange = 0xFFFFFFFF

// stdioConn is a net.Conn over this process's stdin and stdout (controlbase needs a net.Conn).
type stdioConn struct{}

func (stdioConn) Read(b []byte) (int, error)         { return os.Stdin.Read(b) }
func (stdioConn) Write(b []byte) (int, error)        { return os.Stdout.Write(b) }
func (stdioConn) Close() error                       { return nil }
func (stdioConn) LocalAddr() net.Addr                { return &net.UnixAddr{Name: "stdio", Net: "unix"} }
func (stdioConn) RemoteAddr() net.Addr               { return &net.UnixAddr{Name: "stdio", Net: "unix"} }
func (stdioConn) SetDeadline(t time.Time) error      { return nil }
func (stdioConn) SetReadDeadline(t time.Time) error  { return nil }
func (stdioConn) SetWriteDeadline(t time.Time) error { return nil }

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tsvectors: "+format+"\n", args...)
	os.Exit(1)
}

func machinePrivate(hexKey string) key.MachinePrivate {
	var k key.MachinePrivate
	if err := k.UnmarshalText([]byte("privkey:" + hexKey)); err != nil {
		fatal("machine private key: %v", err)
	}
	return k
}

func machinePublic(hexKey string) key.MachinePublic {
	var k key.MachinePublic
	if err := k.UnmarshalText([]byte("mkey:" + hexKey)); err != nil {
		fatal("machine public key: %v", err)
	}
	return k
}

func challengePublic(hexKey string) key.ChallengePublic {
	var k key.ChallengePublic
	if err := k.UnmarshalText([]byte("chalpub:" + hexKey)); err != nil {
		fatal("challenge key: %v", err)
	}
	return k
}

// writeEarlyPayload writes the EarlyNoise payload the way headscale's early-noise writer does:
// magic, u32 BE length, json.Marshal(tailcfg.EarlyNoise).
func writeEarlyPayload(w io.Writer, challenge key.ChallengePublic) error {
	body, err := json.Marshal(&tailcfg.EarlyNoise{NodeKeyChallenge: challenge})
	if err != nil {
		return err
	}
	buf := []byte(ts2021.EarlyPayloadMagic)
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(body)))
	buf = append(buf, body...)
	_, err = w.Write(buf)
	return err
}

func readMessage(r io.Reader) ([]byte, bool, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, false, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == endOfExchange {
		return nil, true, nil
	}
	if n > 16<<20 {
		return nil, false, fmt.Errorf("message of %d bytes", n)
	}
	msg := make([]byte, n)
	_, err := io.ReadFull(r, msg)
	return msg, false, err
}

func writeMessage(w io.Writer, msg []byte) error {
	buf := binary.BigEndian.AppendUint32(nil, uint32(len(msg)))
	buf = append(buf, msg...)
	_, err := w.Write(buf)
	return err
}

// echo answers every message with the same bytes until the peer ends the exchange, then ends it too.
func echo(c io.ReadWriter) (int, error) {
	count := 0
	for {
		msg, end, err := readMessage(c)
		if err != nil {
			return count, err
		}
		if end {
			_, err := c.Write(binary.BigEndian.AppendUint32(nil, endOfExchange))
			return count, err
		}
		if err := writeMessage(c, msg); err != nil {
			return count, err
		}
		count++
	}
}

type report struct {
	Mode             string `json:"mode"`
	Peer             string `json:"peer,omitempty"`
	Version          int    `json:"version"`
	HandshakeHash    string `json:"handshake_hash"`
	EarlyChallenge   string `json:"early_challenge,omitempty"`
	MessagesEchoed   int    `json:"messages_echoed"`
	MessagesVerified int    `json:"messages_verified"`
}

func emit(w io.Writer, r report) {
	b, _ := json.Marshal(r)
	fmt.Fprintf(w, "%s\n", b)
}

// exchange sends messages of the given sizes (deterministic content from seed), checks each echo,
// then ends the exchange.
func exchange(c io.ReadWriter, sizes []int, seed int64) (int, error) {
	rng := rand.New(rand.NewSource(seed))
	for i, size := range sizes {
		msg := make([]byte, size)
		rng.Read(msg)
		if err := writeMessage(c, msg); err != nil {
			return i, err
		}
		got, end, err := readMessage(c)
		if err != nil {
			return i, err
		}
		if end || string(got) != string(msg) {
			return i, fmt.Errorf("echo %d of %d bytes differs", i, size)
		}
	}
	if _, err := c.Write(binary.BigEndian.AppendUint32(nil, endOfExchange)); err != nil {
		return len(sizes), err
	}
	if _, end, err := readMessage(c); err != nil || !end {
		return len(sizes), fmt.Errorf("peer did not end the exchange: %v", err)
	}
	return len(sizes), nil
}

func parseSizes(s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil {
			fatal("size %q: %v", f, err)
		}
		out = append(out, n)
	}
	return out
}

func noiseServer(args []string) {
	fs := flag.NewFlagSet("noise-server", flag.ExitOnError)
	priv := fs.String("key", "", "server machine private key, hex")
	chal := fs.String("challenge", "", "early payload challenge public key, hex (empty: no early payload)")
	fs.Parse(args)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := controlbase.Server(ctx, stdioConn{}, machinePrivate(*priv), nil)
	if err != nil {
		fatal("server handshake: %v", err)
	}
	if *chal != "" {
		if err := writeEarlyPayload(conn, challengePublic(*chal)); err != nil {
			fatal("early payload: %v", err)
		}
	}
	n, err := echo(conn)
	if err != nil {
		fatal("echo after %d messages: %v", n, err)
	}
	h := conn.HandshakeHash()
	emit(os.Stderr, report{Mode: "noise-server", Peer: conn.Peer().String(), Version: conn.ProtocolVersion(),
		HandshakeHash: hex.EncodeToString(h[:]), MessagesEchoed: n})
}

func clientSide(mode string, nc *controlbase.Conn, sizes []int, seed int64, out io.Writer) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn := ts2021.NewConn(nc, func() {})
	early, err := conn.GetEarlyPayload(ctx)
	if err != nil {
		fatal("early payload: %v", err)
	}
	r := report{Mode: mode, Version: nc.ProtocolVersion()}
	if early != nil {
		r.EarlyChallenge = early.NodeKeyChallenge.String()
	}
	n, err := exchange(conn, sizes, seed)
	if err != nil {
		fatal("exchange after %d messages: %v", n, err)
	}
	h := nc.HandshakeHash()
	r.HandshakeHash = hex.EncodeToString(h[:])
	r.MessagesVerified = n
	r.Peer = nc.Peer().String()
	emit(out, r)
}

func noiseClient(args []string) {
	fs := flag.NewFlagSet("noise-client", flag.ExitOnError)
	priv := fs.String("key", "", "client machine private key, hex")
	server := fs.String("server", "", "server machine public key, hex")
	version := fs.Int("version", 130, "protocol (capability) version")
	sizes := fs.String("sizes", "1,4077,4078,10000", "message sizes")
	seed := fs.Int64("seed", 1, "content seed")
	fs.Parse(args)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	nc, err := controlbase.Client(ctx, stdioConn{}, machinePrivate(*priv), machinePublic(*server), uint16(*version))
	if err != nil {
		fatal("client handshake: %v", err)
	}
	clientSide("noise-client", nc, parseSizes(*sizes), *seed, os.Stderr)
}

func httpServer(args []string) {
	fs := flag.NewFlagSet("http-server", flag.ExitOnError)
	priv := fs.String("key", "", "server machine private key, hex")
	chal := fs.String("challenge", "", "early payload challenge public key, hex")
	fs.Parse(args)
	private := machinePrivate(*priv)
	challenge := challengePublic(*chal)
	mux := http.NewServeMux()
	mux.HandleFunc("/key", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("v") == "" {
			http.Error(w, "missing v", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(&tailcfg.OverTLSPublicKeyResponse{PublicKey: private.Public()})
	})
	mux.HandleFunc("/ts2021", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		conn, err := controlhttpserver.AcceptHTTP(ctx, w, r, private, func(_ int, w io.Writer) error {
			return writeEarlyPayload(w, challenge)
		})
		if err != nil {
			fmt.Fprintf(os.Stderr, "tsvectors: accept: %v\n", err)
			return
		}
		defer conn.Close()
		n, err := echo(conn)
		if err != nil && !errors.Is(err, io.EOF) {
			fmt.Fprintf(os.Stderr, "tsvectors: echo after %d: %v\n", n, err)
			return
		}
		h := conn.HandshakeHash()
		emit(os.Stderr, report{Mode: "http-server", Peer: conn.Peer().String(), Version: conn.ProtocolVersion(),
			HandshakeHash: hex.EncodeToString(h[:]), MessagesEchoed: n})
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal("listen: %v", err)
	}
	fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
	// Serve until stdin closes (the test's end of the pipe), so the process never outlives it.
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	if err := http.Serve(ln, mux); err != nil {
		fatal("serve: %v", err)
	}
}

func httpClient(args []string) {
	fs := flag.NewFlagSet("http-client", flag.ExitOnError)
	priv := fs.String("key", "", "client machine private key, hex")
	server := fs.String("server", "", "server machine public key, hex")
	port := fs.String("port", "", "HTTP port on 127.0.0.1")
	version := fs.Int("version", 130, "protocol (capability) version")
	sizes := fs.String("sizes", "1,4077,4078,10000", "message sizes")
	seed := fs.Int64("seed", 1, "content seed")
	fs.Parse(args)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d := &controlhttp.Dialer{
		Hostname:        "127.0.0.1",
		HTTPPort:        *port,
		HTTPSPort:       controlhttp.NoPort,
		MachineKey:      machinePrivate(*priv),
		ControlKey:      machinePublic(*server),
		ProtocolVersion: uint16(*version),
		Dialer:          (&net.Dialer{}).DialContext,
		NetMon:          netmon.NewStatic(),
		HealthTracker:   health.NewTracker(eventbus.New()),
		Logf:            func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) },
	}
	cc, err := d.Dial(ctx)
	if err != nil {
		fatal("dial: %v", err)
	}
	defer cc.Close()
	clientSide("http-client", cc.Conn, parseSizes(*sizes), *seed, os.Stdout)
}

// Disco requests and answers (JSON).

type discoMessage struct {
	Type      string   `json:"type"` // ping, pong, call_me_maybe
	TxID      string   `json:"tx_id,omitempty"`
	NodeKey   string   `json:"node_key,omitempty"`
	Padding   int      `json:"padding,omitempty"`
	Src       string   `json:"src,omitempty"`
	Endpoints []string `json:"endpoints,omitempty"`
}

type discoRequest struct {
	// Private is the disco private key (hex) of the side Go plays; Peer is the other side's public key.
	Private   string         `json:"private"`
	Peer      string         `json:"peer"`
	Seal      []discoMessage `json:"seal"`
	Open      []string       `json:"open"`      // base64 packets sealed by the peer to Private
	Marshal   []discoMessage `json:"marshal"`   // messages to encode without sealing
	Parse     []string       `json:"parse"`     // base64 cleartext messages to parse
	Keys      []string       `json:"keys"`      // hex raw keys to format in every text form
	Unmarshal []string       `json:"unmarshal"` // text forms to parse as NodePublic
}

type discoOpened struct {
	OK      bool          `json:"ok"`
	Sender  string        `json:"sender,omitempty"`
	Message *discoMessage `json:"message,omitempty"`
	Error   string        `json:"error,omitempty"`
}

type discoAnswer struct {
	Public    string              `json:"public"`
	Sealed    []string            `json:"sealed"`
	Opened    []discoOpened       `json:"opened"`
	Marshaled []string            `json:"marshaled"`
	Parsed    []discoOpened       `json:"parsed"`
	Keys      []map[string]string `json:"keys"`
	Unmarshal []discoOpened       `json:"unmarshal"`
}

func toGo(m discoMessage) disco.Message {
	switch m.Type {
	case "ping":
		p := &disco.Ping{Padding: m.Padding}
		tx, _ := hex.DecodeString(m.TxID)
		copy(p.TxID[:], tx)
		if m.NodeKey != "" {
			if err := p.NodeKey.UnmarshalText([]byte(m.NodeKey)); err != nil {
				fatal("node key: %v", err)
			}
		}
		return p
	case "pong":
		p := &disco.Pong{Src: netip.MustParseAddrPort(m.Src)}
		tx, _ := hex.DecodeString(m.TxID)
		copy(p.TxID[:], tx)
		return p
	case "call_me_maybe":
		c := &disco.CallMeMaybe{}
		for _, e := range m.Endpoints {
			c.MyNumber = append(c.MyNumber, netip.MustParseAddrPort(e))
		}
		return c
	}
	fatal("unknown message type %q", m.Type)
	return nil
}

func fromGo(m disco.Message) *discoMessage {
	switch m := m.(type) {
	case *disco.Ping:
		out := &discoMessage{Type: "ping", TxID: hex.EncodeToString(m.TxID[:]), Padding: m.Padding}
		if !m.NodeKey.IsZero() {
			out.NodeKey = m.NodeKey.String()
		}
		return out
	case *disco.Pong:
		return &discoMessage{Type: "pong", TxID: hex.EncodeToString(m.TxID[:]), Src: m.Src.String()}
	case *disco.CallMeMaybe:
		out := &discoMessage{Type: "call_me_maybe", Endpoints: []string{}}
		for _, e := range m.MyNumber {
			out.Endpoints = append(out.Endpoints, e.String())
		}
		return out
	}
	return &discoMessage{Type: fmt.Sprintf("%T", m)}
}

func discoMode() {
	var req discoRequest
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fatal("request: %v", err)
	}
	raw, err := hex.DecodeString(req.Private)
	if err != nil || len(raw) != 32 {
		fatal("private key")
	}
	priv := key.DiscoPrivateFromRaw32(mem.B(raw))
	peerRaw, err := hex.DecodeString(req.Peer)
	if err != nil || len(peerRaw) != 32 {
		fatal("peer key")
	}
	peer := key.DiscoPublicFromRaw32(mem.B(peerRaw))
	shared := priv.Shared(peer)
	ans := discoAnswer{Public: priv.Public().String(), Sealed: []string{}, Opened: []discoOpened{},
		Marshaled: []string{}, Parsed: []discoOpened{}, Keys: []map[string]string{}, Unmarshal: []discoOpened{}}
	// Seal as magicsock's sendDiscoMessage does: magic, our disco public key, box of the message.
	for _, m := range req.Seal {
		pkt := []byte(disco.Magic)
		pkt = priv.Public().AppendTo(pkt)
		pkt = append(pkt, shared.Seal(toGo(m).AppendMarshal(nil))...)
		ans.Sealed = append(ans.Sealed, base64.StdEncoding.EncodeToString(pkt))
	}
	// Open as magicsock's handleDiscoMessage does.
	for _, b64 := range req.Open {
		pkt, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			fatal("open: %v", err)
		}
		src, ok := disco.Source(pkt)
		if !ok {
			ans.Opened = append(ans.Opened, discoOpened{Error: "not disco"})
			continue
		}
		sender := key.DiscoPublicFromRaw32(mem.B(src))
		clear, ok := priv.Shared(sender).Open(pkt[len(disco.Magic)+key.DiscoPublicRawLen:])
		if !ok {
			ans.Opened = append(ans.Opened, discoOpened{Sender: sender.String(), Error: "box did not open"})
			continue
		}
		m, err := disco.Parse(clear)
		if err != nil {
			ans.Opened = append(ans.Opened, discoOpened{Sender: sender.String(), Error: err.Error()})
			continue
		}
		ans.Opened = append(ans.Opened, discoOpened{OK: true, Sender: sender.String(), Message: fromGo(m)})
	}
	for _, m := range req.Marshal {
		ans.Marshaled = append(ans.Marshaled, base64.StdEncoding.EncodeToString(toGo(m).AppendMarshal(nil)))
	}
	for _, b64 := range req.Parse {
		b, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			fatal("parse: %v", err)
		}
		m, err := disco.Parse(b)
		if err != nil {
			ans.Parsed = append(ans.Parsed, discoOpened{Error: err.Error()})
			continue
		}
		ans.Parsed = append(ans.Parsed, discoOpened{OK: true, Message: fromGo(m)})
	}
	for _, h := range req.Keys {
		raw, err := hex.DecodeString(h)
		if err != nil || len(raw) != 32 {
			fatal("key %q", h)
		}
		forms := map[string]string{}
		mp := key.MachinePublicFromRaw32(mem.B(raw))
		forms["machine_public"] = mp.String()
		np := key.NodePublicFromRaw32(mem.B(raw))
		forms["node_public"] = np.String()
		dp := key.DiscoPublicFromRaw32(mem.B(raw))
		forms["disco_public"] = dp.String()
		var cp key.ChallengePublic
		if err := cp.UnmarshalText([]byte("chalpub:" + h)); err != nil {
			fatal("chalpub: %v", err)
		}
		forms["challenge_public"] = cp.String()
		nk := key.NodePrivateFromRaw32(mem.B(raw))
		text, _ := nk.MarshalText()
		forms["node_private"] = string(text)
		var mk key.MachinePrivate
		if err := mk.UnmarshalText([]byte("privkey:" + h)); err != nil {
			fatal("privkey: %v", err)
		}
		text, _ = mk.MarshalText()
		forms["machine_private"] = string(text)
		if !nk.IsZero() {
			forms["node_private_public"] = nk.Public().String()
			forms["machine_private_public"] = mk.Public().String()
		}
		js, _ := json.Marshal(struct {
			Key key.NodePublic
		}{np})
		forms["node_public_json"] = string(js)
		ans.Keys = append(ans.Keys, forms)
	}
	for _, text := range req.Unmarshal {
		var k key.NodePublic
		if err := k.UnmarshalText([]byte(text)); err != nil {
			ans.Unmarshal = append(ans.Unmarshal, discoOpened{Error: err.Error()})
			continue
		}
		ans.Unmarshal = append(ans.Unmarshal, discoOpened{OK: true, Sender: k.String()})
	}
	if err := json.NewEncoder(os.Stdout).Encode(&ans); err != nil {
		fatal("answer: %v", err)
	}
}

type zstdRequest struct {
	Encode []string `json:"encode"` // base64 bodies to compress
	Decode []string `json:"decode"` // base64 frames to decompress
}

type zstdDecoded struct {
	OK    bool   `json:"ok"`
	Data  string `json:"data,omitempty"`
	Error string `json:"error,omitempty"`
}

type zstdAnswer struct {
	Encoded        []string      `json:"encoded"`
	EncodedFastest []string      `json:"encoded_fastest"`
	Decoded        []zstdDecoded `json:"decoded"`
}

func zstdMode() {
	var req zstdRequest
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fatal("request: %v", err)
	}
	ans := zstdAnswer{Encoded: []string{}, EncodedFastest: []string{}, Decoded: []zstdDecoded{}}
	for _, b64 := range req.Encode {
		body, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			fatal("encode: %v", err)
		}
		ans.Encoded = append(ans.Encoded, base64.StdEncoding.EncodeToString(zstdframe.AppendEncode(nil, body)))
		fastest := zstdframe.AppendEncode(nil, body, zstdframe.FastestCompression)
		ans.EncodedFastest = append(ans.EncodedFastest, base64.StdEncoding.EncodeToString(fastest))
	}
	for _, b64 := range req.Decode {
		frame, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			fatal("decode: %v", err)
		}
		// As controlclient's decodeMsg: no options.
		out, err := zstdframe.AppendDecode(nil, frame)
		if err != nil {
			ans.Decoded = append(ans.Decoded, zstdDecoded{Error: err.Error()})
			continue
		}
		ans.Decoded = append(ans.Decoded, zstdDecoded{OK: true, Data: base64.StdEncoding.EncodeToString(out)})
	}
	if err := json.NewEncoder(os.Stdout).Encode(&ans); err != nil {
		fatal("answer: %v", err)
	}
}

// streamByte is the content of byte i of every /stream body (251 is prime, so a lost, doubled or
// reordered frame of any power-of-two size shows).
func streamByte(i int) byte { return byte(i % 251) }

// progress counts the bytes each tagged /stream handler has handed to http2 so far.
var progress sync.Map // tag -> *atomic.Int64

// h2Routes is what h2-server serves inside Noise, for the connection of peer at version:
//
//	GET  /whoami                    {"peer": "mkey:...", "version": N}
//	POST /echo                      the request body back; X-Echo and Content-Type copied back
//	GET  /stream?bytes=N&chunk=K&tag=T  N bytes of streamByte, flushed every K bytes
//	GET  /progress?tag=T            {"written": bytes the /stream tagged T has written}
//	GET  /reset                     the handler aborts: the stream is reset
func h2Routes(peer key.MachinePublic, version int) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/whoami", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"peer": peer.String(), "version": version, "proto": r.Proto})
	})
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("X-Echo", r.Header.Get("X-Echo"))
		w.Header().Set("X-Method", r.Method)
		w.Header().Set("Content-Type", r.Header.Get("Content-Type"))
		w.WriteHeader(http.StatusOK)
		w.Write(body)
	})
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("bytes"))
		chunk, _ := strconv.Atoi(r.URL.Query().Get("chunk"))
		if chunk <= 0 {
			chunk = 16 << 10
		}
		counter := new(atomic.Int64)
		if tag := r.URL.Query().Get("tag"); tag != "" {
			progress.Store(tag, counter)
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.WriteHeader(http.StatusOK)
		flusher := w.(http.Flusher)
		buf := make([]byte, chunk)
		for sent := 0; sent < n; {
			k := min(chunk, n-sent)
			for i := 0; i < k; i++ {
				buf[i] = streamByte(sent + i)
			}
			if _, err := w.Write(buf[:k]); err != nil {
				return
			}
			flusher.Flush()
			sent += k
			counter.Store(int64(sent))
		}
	})
	mux.HandleFunc("/progress", func(w http.ResponseWriter, r *http.Request) {
		written := int64(-1)
		if v, ok := progress.Load(r.URL.Query().Get("tag")); ok {
			written = v.(*atomic.Int64).Load()
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"written": written})
	})
	mux.HandleFunc("/reset", func(w http.ResponseWriter, r *http.Request) {
		panic(http.ErrAbortHandler)
	})
	return mux
}

func h2Server(args []string) {
	fs := flag.NewFlagSet("h2-server", flag.ExitOnError)
	priv := fs.String("key", "", "server machine private key, hex")
	chal := fs.String("challenge", "", "early payload challenge public key, hex")
	fs.Parse(args)
	private := machinePrivate(*priv)
	challenge := challengePublic(*chal)
	mux := http.NewServeMux()
	mux.HandleFunc("/key", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(&tailcfg.OverTLSPublicKeyResponse{PublicKey: private.Public()})
	})
	mux.HandleFunc("/ts2021", func(w http.ResponseWriter, r *http.Request) {
		conn, err := controlhttpserver.AcceptHTTP(r.Context(), w, r, private, func(_ int, w io.Writer) error {
			return writeEarlyPayload(w, challenge)
		})
		if err != nil {
			fmt.Fprintf(os.Stderr, "tsvectors: accept: %v\n", err)
			return
		}
		// As headscale does: one HTTP/2 server connection per upgraded Noise conn.
		(&http2.Server{}).ServeConn(conn, &http2.ServeConnOpts{
			Context: r.Context(),
			Handler: h2Routes(conn.Peer(), conn.ProtocolVersion()),
		})
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal("listen: %v", err)
	}
	fmt.Printf("PORT %d\n", ln.Addr().(*net.TCPAddr).Port)
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	if err := http.Serve(ln, mux); err != nil {
		fatal("serve: %v", err)
	}
}

type ts2021Report struct {
	Mode        string `json:"mode"`
	Whoami      string `json:"whoami"`
	EchoBytes   int    `json:"echo_bytes"`
	EchoHeader  string `json:"echo_header"`
	StreamBytes int    `json:"stream_bytes"`
	Concurrent  int    `json:"concurrent_ok"`
	Proto       string `json:"proto"`
	NotFound    int    `json:"not_found_status"`
}

func ts2021Client(args []string) {
	fs := flag.NewFlagSet("ts2021-client", flag.ExitOnError)
	priv := fs.String("key", "", "client machine private key, hex")
	server := fs.String("server", "", "server machine public key, hex")
	serverURL := fs.String("url", "", "control URL, http://127.0.0.1:PORT")
	version := fs.Int("version", 130, "protocol (capability) version")
	echoBytes := fs.Int("echo-bytes", 300000, "size of the big echo")
	streamBytes := fs.Int("stream-bytes", 5<<20, "size of the streamed body")
	concurrent := fs.Int("concurrent", 8, "concurrent echoes")
	fs.Parse(args)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	nc, err := ts2021.NewClient(ts2021.ClientOpts{
		ServerURL:       *serverURL,
		PrivKey:         machinePrivate(*priv),
		ServerPubKey:    machinePublic(*server),
		Dialer:          tsdial.NewDialer(netmon.NewStatic()),
		Logf:            func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) },
		NetMon:          netmon.NewStatic(),
		HealthTracker:   health.NewTracker(eventbus.New()),
		ProtocolVersion: uint16(*version),
	})
	if err != nil {
		fatal("client: %v", err)
	}
	defer nc.Close()
	rep := ts2021Report{Mode: "ts2021-client"}
	do := func(method, path string, body []byte, hdr map[string]string) (*http.Response, []byte) {
		req, err := http.NewRequestWithContext(ctx, method, "https://control"+path, strings.NewReader(string(body)))
		if err != nil {
			fatal("request: %v", err)
		}
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := nc.Do(req)
		if err != nil {
			fatal("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		got, err := io.ReadAll(resp.Body)
		if err != nil {
			fatal("%s %s body: %v", method, path, err)
		}
		return resp, got
	}
	resp, got := do("GET", "/whoami", nil, nil)
	rep.Whoami = string(got)
	rep.Proto = resp.Proto
	msg := make([]byte, *echoBytes)
	rand.New(rand.NewSource(7)).Read(msg)
	resp, got = do("POST", "/echo", msg, map[string]string{"X-Echo": "tsvectors", "Content-Type": "application/json"})
	if resp.StatusCode != 200 || string(got) != string(msg) {
		fatal("echo: status %d, %d bytes back of %d", resp.StatusCode, len(got), len(msg))
	}
	rep.EchoBytes = len(got)
	rep.EchoHeader = resp.Header.Get("X-Echo")
	// The stream and the concurrent echoes share the one Noise connection (MaxConnsPerHost 1).
	var wg sync.WaitGroup
	var ok atomic.Int64
	streamed := make(chan int, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, body := do("GET", fmt.Sprintf("/stream?bytes=%d", *streamBytes), nil, nil)
		for i, b := range body {
			if b != streamByte(i) {
				fatal("stream byte %d is %d", i, b)
			}
		}
		streamed <- len(body)
	}()
	for i := 0; i < *concurrent; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			want := fmt.Sprintf("echo %d %s", i, strings.Repeat("x", i*1000))
			resp, body := do("POST", "/echo", []byte(want), map[string]string{"X-Echo": strconv.Itoa(i)})
			if resp.StatusCode == 200 && string(body) == want && resp.Header.Get("X-Echo") == strconv.Itoa(i) {
				ok.Add(1)
			}
		}(i)
	}
	wg.Wait()
	rep.StreamBytes = <-streamed
	rep.Concurrent = int(ok.Load())
	resp, _ = do("GET", "/no-such-route", nil, nil)
	rep.NotFound = resp.StatusCode
	emit2(os.Stdout, rep)
}

func emit2(w io.Writer, r ts2021Report) {
	b, _ := json.Marshal(r)
	fmt.Fprintf(w, "%s\n", b)
}

func main() {
	if len(os.Args) < 2 {
		fatal("usage: tsvectors noise-server|noise-client|http-server|http-client|h2-server|ts2021-client|disco|zstd [flags]")
	}
	switch os.Args[1] {
	case "noise-server":
		noiseServer(os.Args[2:])
	case "noise-client":
		noiseClient(os.Args[2:])
	case "http-server":
		httpServer(os.Args[2:])
	case "http-client":
		httpClient(os.Args[2:])
	case "h2-server":
		h2Server(os.Args[2:])
	case "ts2021-client":
		ts2021Client(os.Args[2:])
	case "disco":
		discoMode()
	case "zstd":
		zstdMode()
	case "derp-client":
		derpClientMode(os.Args[2:])
	default:
		fatal("unknown mode %q", os.Args[1])
	}
}

// derpClientMode runs Tailscale's DERP client against a DERP server (see the mode list above).
func derpClientMode(args []string) {
	if len(args) != 1 {
		fatal("usage: tsvectors derp-client URL")
	}
	priv := key.NewNode()
	c, err := derphttp.NewClient(priv, args[0], func(string, ...any) {}, netmon.NewStatic())
	if err != nil {
		fatal("derp client: %v", err)
	}
	c.SetCanAckPings(true)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		fatal("derp connect: %v", err)
	}
	var mu sync.Mutex
	emit := func(v map[string]any) {
		b, _ := json.Marshal(v)
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(os.Stdout, "%s\n", b)
	}
	emit(map[string]any{"event": "ready", "key": priv.Public().String(), "server": c.ServerPublicKey().String()})
	go func() {
		for {
			m, err := c.Recv()
			if err != nil {
				emit(map[string]any{"event": "error", "error": err.Error()})
				return
			}
			switch m := m.(type) {
			case derp.ReceivedPacket:
				emit(map[string]any{"event": "packet", "src": m.Source.String(), "data": hex.EncodeToString(m.Data)})
			case derp.PeerGoneMessage:
				emit(map[string]any{"event": "peergone", "peer": m.Peer.String(), "reason": int(m.Reason)})
			case derp.ServerInfoMessage:
				emit(map[string]any{"event": "serverinfo"})
			case derp.PingMessage:
				// magicsock answers the server's pings the same way.
				go c.SendPong(m)
				emit(map[string]any{"event": "ping", "data": hex.EncodeToString(m[:])})
			case derp.HealthMessage:
				emit(map[string]any{"event": "health", "problem": m.Problem})
			case derp.ServerRestartingMessage:
				emit(map[string]any{"event": "restarting", "reconnect_ms": m.ReconnectIn.Milliseconds(), "try_ms": m.TryFor.Milliseconds()})
			case derp.KeepAliveMessage:
				emit(map[string]any{"event": "keepalive"})
			}
		}
	}()
	lines := bufio.NewScanner(os.Stdin)
	lines.Buffer(make([]byte, 1<<20), 1<<20)
	for lines.Scan() {
		fields := strings.Fields(lines.Text())
		if len(fields) == 0 {
			continue
		}
		switch fields[0] {
		case "send":
			var dst key.NodePublic
			if err := dst.UnmarshalText([]byte(fields[1])); err != nil {
				fatal("bad key: %v", err)
			}
			data, err := hex.DecodeString(fields[2])
			if err != nil {
				fatal("bad hex: %v", err)
			}
			if err := c.Send(dst, data); err != nil {
				emit(map[string]any{"event": "error", "error": err.Error()})
			}
		case "ping":
			if err := c.Ping(context.Background()); err != nil {
				emit(map[string]any{"event": "error", "error": err.Error()})
			} else {
				emit(map[string]any{"event": "pong"})
			}
		case "preferred":
			c.NotePreferred(true)
		case "close":
			c.Close()
			return
		}
	}
	c.Close()
}
