// derpload is a DERP load generator built on Tailscale's own DERP client (tailscale.com/derp and
// derp/derphttp v1.102.5), for benchmarks/bench_derp.py: the same clients drive embedmesh's DERP
// server and Tailscale's derper, so the two servers are measured alike.
//
//	derpload bulk [flags] URL [RECEIVER_URL]
//	    One sender, one receiver (on RECEIVER_URL if given: another server of a mesh). The sender
//	    keeps at most -window packets of -size bytes in flight; the receiver acknowledges the
//	    highest sequence number it has seen every -ack packets, through the relay, so losses (head
//	    drops) never stall the pump.
//	derpload pps [flags] URL
//	    -clients clients in pairs; each sends -window packets of -size bytes to its partner and
//	    answers every packet it receives with one more (a closed loop). A client that heard nothing
//	    for 500 ms sends a fresh window, so drops never end its loop.
//
// Output, one JSON object a line on stdout: {"event":"ready"} when every client is connected,
// {"event":"start"} when the measurement begins (after -warmup seconds), and {"event":"done",...}
// with the packets and bytes received in the -seconds that followed, the packets sent, and the
// generator's own CPU seconds.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
)

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "derpload: "+format+"\n", args...)
	os.Exit(1)
}

func emit(v map[string]any) {
	b, _ := json.Marshal(v)
	fmt.Fprintf(os.Stdout, "%s\n", b)
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

type client struct {
	c   *derphttp.Client
	key key.NodePublic
}

func connect(url string) *client {
	priv := key.NewNode()
	c, err := derphttp.NewClient(priv, url, func(string, ...any) {}, netmon.NewStatic())
	if err != nil {
		fatal("client for %s: %v", url, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		fatal("connect to %s: %v", url, err)
	}
	return &client{c: c, key: priv.Public()}
}

type counters struct {
	recvPackets atomic.Int64
	recvBytes   atomic.Int64
	sent        atomic.Int64
}

func (c *counters) snapshot() (int64, int64, int64) {
	return c.recvPackets.Load(), c.recvBytes.Load(), c.sent.Load()
}

func measure(n *counters, warmup, seconds float64) {
	time.Sleep(time.Duration(warmup * float64(time.Second)))
	p0, b0, s0 := n.snapshot()
	cpu0 := cpuSeconds()
	t0 := time.Now()
	emit(map[string]any{"event": "start"})
	time.Sleep(time.Duration(seconds * float64(time.Second)))
	p1, b1, s1 := n.snapshot()
	elapsed := time.Since(t0).Seconds()
	emit(map[string]any{
		"event": "done", "seconds": elapsed, "packets": p1 - p0, "bytes": b1 - b0, "sent": s1 - s0,
		"cpu": cpuSeconds() - cpu0,
	})
}

func bulk(args []string) {
	fs := flag.NewFlagSet("bulk", flag.ExitOnError)
	size := fs.Int("size", 1280, "packet size in bytes")
	window := fs.Int64("window", 32, "packets in flight")
	ackEvery := fs.Int("ack", 0, "packets per acknowledgement (default: a quarter of the window)")
	warmup := fs.Float64("warmup", 1, "seconds before measuring")
	seconds := fs.Float64("seconds", 5, "seconds to measure")
	fs.Parse(args)
	if fs.NArg() < 1 || fs.NArg() > 2 || *size < 8 {
		fatal("usage: derpload bulk [-size N] [-window N] [-warmup S] [-seconds S] URL [RECEIVER_URL]")
	}
	if *ackEvery <= 0 {
		*ackEvery = max(1, int(*window/4))
	}
	recvURL := fs.Arg(0)
	if fs.NArg() == 2 {
		recvURL = fs.Arg(1)
	}
	sender, receiver := connect(fs.Arg(0)), connect(recvURL)
	emit(map[string]any{"event": "ready"})
	var n counters
	var acked atomic.Int64 // the highest sequence number the receiver has seen, plus one
	acks := make(chan struct{}, 1)
	go func() { // the receiver: count, acknowledge
		ack := make([]byte, 16)
		var highest int64 = -1
		var since int
		for {
			m, err := receiver.c.Recv()
			if err != nil {
				fatal("receiver: %v", err)
			}
			p, ok := m.(derp.ReceivedPacket)
			if !ok || len(p.Data) < 8 {
				continue
			}
			n.recvPackets.Add(1)
			n.recvBytes.Add(int64(len(p.Data)))
			if seq := int64(binary.BigEndian.Uint64(p.Data)); seq > highest {
				highest = seq
			}
			if since++; since >= *ackEvery {
				since = 0
				binary.BigEndian.PutUint64(ack, uint64(highest+1))
				if err := receiver.c.Send(sender.key, ack); err != nil {
					fatal("receiver send: %v", err)
				}
			}
		}
	}()
	go func() { // the sender's acknowledgements
		for {
			m, err := sender.c.Recv()
			if err != nil {
				fatal("sender: %v", err)
			}
			if p, ok := m.(derp.ReceivedPacket); ok && len(p.Data) >= 8 {
				if v := int64(binary.BigEndian.Uint64(p.Data)); v > acked.Load() {
					acked.Store(v)
					select {
					case acks <- struct{}{}:
					default:
					}
				}
			}
		}
	}()
	go func() { // the sender
		payload := make([]byte, *size)
		var seq int64
		for {
			for seq-acked.Load() >= *window {
				select {
				case <-acks:
				case <-time.After(100 * time.Millisecond):
					// Everything in flight (or the acknowledgements) was dropped: start a new window.
					acked.Store(seq)
				}
			}
			binary.BigEndian.PutUint64(payload, uint64(seq))
			if err := sender.c.Send(receiver.key, payload); err != nil {
				fatal("sender send: %v", err)
			}
			seq++
			n.sent.Add(1)
		}
	}()
	measure(&n, *warmup, *seconds)
}

func pps(args []string) {
	fs := flag.NewFlagSet("pps", flag.ExitOnError)
	clients := fs.Int("clients", 1000, "connected clients (pairs)")
	size := fs.Int("size", 64, "packet size in bytes")
	window := fs.Int("window", 4, "packets each client keeps in flight")
	warmup := fs.Float64("warmup", 1, "seconds before measuring")
	seconds := fs.Float64("seconds", 5, "seconds to measure")
	fs.Parse(args)
	if fs.NArg() != 1 || *clients < 2 || *clients%2 != 0 {
		fatal("usage: derpload pps [-clients EVEN] [-size N] [-window N] [-warmup S] [-seconds S] URL")
	}
	all := make([]*client, *clients)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32) // connect 32 at a time
	for i := range all {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sem <- struct{}{}
			all[i] = connect(fs.Arg(0))
			<-sem
		}(i)
	}
	wg.Wait()
	emit(map[string]any{"event": "ready"})
	var n counters
	for i, me := range all {
		partner := all[i^1]
		var heard atomic.Int64
		payload := make([]byte, *size)
		send := func() {
			if err := me.c.Send(partner.key, payload); err != nil {
				fatal("send: %v", err)
			}
			n.sent.Add(1)
		}
		go func() {
			for {
				m, err := me.c.Recv()
				if err != nil {
					fatal("recv: %v", err)
				}
				if p, ok := m.(derp.ReceivedPacket); ok {
					n.recvPackets.Add(1)
					n.recvBytes.Add(int64(len(p.Data)))
					heard.Add(1)
					send()
				}
			}
		}()
		go func() {
			for {
				for range *window {
					send()
				}
				// Refill when the loop died (every packet of it dropped somewhere).
				for {
					before := heard.Load()
					time.Sleep(500 * time.Millisecond)
					if heard.Load() == before {
						break
					}
				}
			}
		}()
	}
	measure(&n, *warmup, *seconds)
}

func main() {
	if len(os.Args) < 2 {
		fatal("usage: derpload bulk|pps [flags] URL")
	}
	switch os.Args[1] {
	case "bulk":
		bulk(os.Args[2:])
	case "pps":
		pps(os.Args[2:])
	default:
		fatal("unknown mode %q", os.Args[1])
	}
}
