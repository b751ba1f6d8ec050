// tsnetcheck: Tailscale's own STUN client and netcheck (tailscale.com v1.102.5), driven by the
// interop tests against embedmesh's STUN server.
//
//	tsnetcheck vectors TXIDHEX IP:PORT   print stun.Request(txid) and stun.Response(txid, addr) as hex
//	tsnetcheck stun IP:PORT              one Binding request; print the parsed response as JSON
//	tsnetcheck parse HEX                 stun.ParseResponse of a datagram; print it as JSON
//	tsnetcheck netcheck DERPMAP.json     a full netcheck (Standalone sockets); print the Report as JSON
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"tailscale.com/net/netcheck"
	"tailscale.com/net/netmon"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
)

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tsnetcheck: "+format+"\n", args...)
	os.Exit(1)
}

func emit(v any) {
	if err := json.NewEncoder(os.Stdout).Encode(v); err != nil {
		fatal("%v", err)
	}
}

func txidFromHex(s string) stun.TxID {
	var tx stun.TxID
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(tx) {
		fatal("a TxID is 24 hex digits, not %q", s)
	}
	copy(tx[:], b)
	return tx
}

func vectors(args []string) {
	if len(args) != 2 {
		fatal("usage: vectors TXIDHEX IP:PORT")
	}
	tx := txidFromHex(args[0])
	addr, err := netip.ParseAddrPort(args[1])
	if err != nil {
		fatal("%v", err)
	}
	emit(map[string]string{
		"request":  hex.EncodeToString(stun.Request(tx)),
		"response": hex.EncodeToString(stun.Response(tx, addr)),
	})
}

func parse(args []string) {
	if len(args) != 1 {
		fatal("usage: parse HEX")
	}
	b, err := hex.DecodeString(args[0])
	if err != nil {
		fatal("%v", err)
	}
	tx, addr, err := stun.ParseResponse(b)
	if err != nil {
		emit(map[string]string{"error": err.Error()})
		return
	}
	emit(map[string]string{"txid": hex.EncodeToString(tx[:]), "addr": addr.String()})
}

func stunOnce(args []string) {
	if len(args) != 1 {
		fatal("usage: stun IP:PORT")
	}
	conn, err := net.Dial("udp", args[0])
	if err != nil {
		fatal("%v", err)
	}
	defer conn.Close()
	tx := stun.NewTxID()
	if _, err := conn.Write(stun.Request(tx)); err != nil {
		fatal("%v", err)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, err := conn.Read(buf)
	if err != nil {
		fatal("no answer: %v", err)
	}
	got, addr, err := stun.ParseResponse(buf[:n])
	if err != nil {
		fatal("parsing the answer: %v", err)
	}
	if got != tx {
		fatal("answer for another transaction")
	}
	emit(map[string]string{"addr": addr.String(), "local": conn.LocalAddr().String()})
}

func runNetcheck(args []string) {
	if len(args) != 1 {
		fatal("usage: netcheck DERPMAP.json")
	}
	raw, err := os.ReadFile(args[0])
	if err != nil {
		fatal("%v", err)
	}
	dm := new(tailcfg.DERPMap)
	if err := json.Unmarshal(raw, dm); err != nil {
		fatal("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := &netcheck.Client{
		NetMon: netmon.NewStatic(),
		Logf:   func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) },
		// Measure every region, as `tailscale netcheck --verbose` does.
		Verbose: true,
	}
	if err := c.Standalone(ctx, ":0"); err != nil {
		fatal("%v", err)
	}
	report, err := c.GetReport(ctx, dm, nil)
	if err != nil {
		fatal("%v", err)
	}
	emit(report)
}

func main() {
	if len(os.Args) < 2 {
		fatal("usage: tsnetcheck vectors|stun|parse|netcheck ...")
	}
	switch os.Args[1] {
	case "vectors":
		vectors(os.Args[2:])
	case "stun":
		stunOnce(os.Args[2:])
	case "parse":
		parse(os.Args[2:])
	case "netcheck":
		runNetcheck(os.Args[2:])
	default:
		fatal("unknown mode %q", os.Args[1])
	}
}
