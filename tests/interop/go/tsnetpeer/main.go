// Command tsnetpeer is a minimal tsnet node for embedmesh's interop tests and benchmarks.
//
// It joins the tailnet of -control with -authkey (state in -dir), prints one JSON line
// {"event":"up",...} on stdout once tsnet reports Running, then serves and/or dials TCP over the
// tailnet:
//
//	-echo PORT      echo every byte back on each accepted connection
//	-discard PORT   read and drop everything, then reply with the byte count (bulk sink)
//	-http PORT      serve HTTP: every GET answers "tsnetpeer HOSTNAME PATH\n"
//	-dial HOST:PORT connect, send -send bytes (or stdin with -send -1), half-close, print what
//	                came back (echo) as {"event":"dialed",...}, and exit unless serving
//	-peers N        before dialing, wait until N peers are in the netmap and print them
//
// Logs (tsnet's and ours) go to stderr.  Set TS_NO_LOGS_NO_SUPPORT=true so nothing is uploaded.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"tailscale.com/tsnet"
)

func emit(v map[string]any) {
	b, err := json.Marshal(v)
	if err != nil {
		log.Fatalf("json: %v", err)
	}
	fmt.Println(string(b)) // one line per event; the test reads stdout line by line
}

func main() {
	control := flag.String("control", "", "control server URL (required)")
	authKey := flag.String("authkey", "", "pre-auth key (or $TS_AUTHKEY)")
	hostname := flag.String("hostname", "tsnetpeer", "node name")
	dir := flag.String("dir", "", "state folder (required)")
	ephemeral := flag.Bool("ephemeral", false, "register as an ephemeral node")
	echoPort := flag.Int("echo", 0, "serve an echo service on this tailnet TCP port")
	discardPort := flag.Int("discard", 0, "serve a byte-counting sink on this tailnet TCP port")
	httpPort := flag.Int("http", 0, "serve HTTP on this tailnet TCP port")
	dial := flag.String("dial", "", "dial this HOST:PORT over the tailnet")
	send := flag.Int("send", 16, "bytes to send when dialing (-1: copy stdin)")
	peers := flag.Int("peers", 0, "wait until this many peers are in the netmap before dialing")
	timeout := flag.Duration("timeout", 60*time.Second, "deadline for coming up, waiting for peers and dialing")
	flag.Parse()
	if *control == "" || *dir == "" {
		log.Fatal("tsnetpeer: -control and -dir are required")
	}
	if *authKey == "" {
		*authKey = os.Getenv("TS_AUTHKEY")
	}

	srv := &tsnet.Server{
		Dir:        *dir,
		Hostname:   *hostname,
		ControlURL: *control,
		AuthKey:    *authKey,
		Ephemeral:  *ephemeral,
		Logf:       func(format string, args ...any) { log.Printf("tsnet: "+format, args...) },
	}
	defer srv.Close()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	st, err := srv.Up(ctx)
	if err != nil {
		log.Fatalf("tsnetpeer: up: %v", err)
	}
	ips := []string{}
	for _, ip := range st.TailscaleIPs {
		ips = append(ips, ip.String())
	}
	emit(map[string]any{"event": "up", "ips": ips, "dns_name": st.Self.DNSName, "backend": st.BackendState})

	serving := false
	if *echoPort != 0 {
		serve(srv, *echoPort, handleEcho)
		serving = true
	}
	if *discardPort != 0 {
		serve(srv, *discardPort, handleDiscard)
		serving = true
	}
	if *httpPort != 0 {
		serveHTTP(srv, *httpPort, *hostname)
		serving = true
	}
	if *peers > 0 {
		waitPeers(ctx, srv, *peers)
	}
	if *dial != "" {
		dialOnce(ctx, srv, *dial, *send)
	}
	if serving {
		emit(map[string]any{"event": "serving", "echo": *echoPort, "discard": *discardPort, "http": *httpPort})
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
		<-sig
	}
}

func serve(srv *tsnet.Server, port int, handle func(net.Conn)) {
	ln, err := srv.Listen("tcp", ":"+strconv.Itoa(port))
	if err != nil {
		log.Fatalf("tsnetpeer: listen :%d: %v", port, err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				log.Printf("tsnetpeer: accept :%d: %v", port, err)
				return
			}
			go handle(c)
		}
	}()
}

// serveHTTP answers every request with the node's name and the path, so a test can tell which
// node it reached and that the request arrived whole.
func serveHTTP(srv *tsnet.Server, port int, hostname string) {
	ln, err := srv.Listen("tcp", ":"+strconv.Itoa(port))
	if err != nil {
		log.Fatalf("tsnetpeer: listen :%d: %v", port, err)
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "tsnetpeer %s %s\n", hostname, r.URL.Path)
	})
	go func() {
		err := http.Serve(ln, handler)
		log.Printf("tsnetpeer: http :%d: %v", port, err)
	}()
}

func handleEcho(c net.Conn) {
	defer c.Close()
	n, err := io.Copy(c, c)
	log.Printf("tsnetpeer: echoed %d bytes to %v (%v)", n, c.RemoteAddr(), err)
}

func handleDiscard(c net.Conn) {
	defer c.Close()
	n, err := io.Copy(io.Discard, c)
	log.Printf("tsnetpeer: discarded %d bytes from %v (%v)", n, c.RemoteAddr(), err)
	fmt.Fprintf(c, "%d\n", n)
}

func waitPeers(ctx context.Context, srv *tsnet.Server, want int) {
	lc, err := srv.LocalClient()
	if err != nil {
		log.Fatalf("tsnetpeer: local client: %v", err)
	}
	for {
		st, err := lc.Status(ctx)
		if err == nil && len(st.Peer) >= want {
			names := []string{}
			for _, p := range st.Peer {
				names = append(names, p.DNSName)
			}
			emit(map[string]any{"event": "peers", "names": names})
			return
		}
		select {
		case <-ctx.Done():
			log.Fatalf("tsnetpeer: waiting for %d peers: %v", want, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func dialOnce(ctx context.Context, srv *tsnet.Server, addr string, size int) {
	start := time.Now()
	c, err := srv.Dial(ctx, "tcp", addr)
	if err != nil {
		log.Fatalf("tsnetpeer: dial %s: %v", addr, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	connected := time.Since(start)
	sent := sha256.New()
	var n int64
	if size < 0 {
		n, err = io.Copy(io.MultiWriter(c, sent), os.Stdin)
	} else {
		payload := make([]byte, size)
		for i := range payload {
			payload[i] = byte(i)
		}
		sent.Write(payload)
		var w int
		w, err = c.Write(payload)
		n = int64(w)
	}
	if err != nil {
		log.Fatalf("tsnetpeer: send to %s: %v", addr, err)
	}
	if tc, ok := c.(interface{ CloseWrite() error }); ok {
		_ = tc.CloseWrite()
	}
	got := sha256.New()
	m, err := io.Copy(got, c)
	if err != nil {
		log.Fatalf("tsnetpeer: read from %s: %v", addr, err)
	}
	emit(map[string]any{
		"event": "dialed", "addr": addr, "sent": n, "received": m,
		"sent_sha256": hex.EncodeToString(sent.Sum(nil)), "received_sha256": hex.EncodeToString(got.Sum(nil)),
		"connect_ms": connected.Milliseconds(), "total_ms": time.Since(start).Milliseconds(),
	})
}
