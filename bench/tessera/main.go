// Command tessera is the baseline of bench/ledger.py: Tessera's POSIX log (the reference
// tlog-tiles implementation) taking N entries from K concurrent appenders, on this machine.
//
// Settings as the issue names them: every batch fsynced (POSIX storage does so), batches of at
// most 1,000 entries or 5 ms, a checkpoint every second. Each appender adds its entries one at a
// time and waits for each to be integrated (the Add future resolves once the entry is in the
// tree and the tree state is fsynced). It prints one JSON object:
//
//	{"entries":N,"appenders":K,"seconds":s,"rate":N/s,"p50_ms":..,"p99_ms":..,"cpu_seconds":..,"size":..}
//
// rate is acknowledged (integrated) entries per second over the whole run; latency is per Add,
// from the call to its integration; size is the integrated tree size read back at the end.
//
//	go build -o var/bin/tessera-bench ./bench/tessera
//	var/bin/tessera-bench -dir /tmp/tlog -entries 20000 -appenders 64
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/transparency-dev/tessera"
	"github.com/transparency-dev/tessera/storage/posix"
	"golang.org/x/mod/sumdb/note"
)

type result struct {
	Entries    int     `json:"entries"`
	Appenders  int     `json:"appenders"`
	Seconds    float64 `json:"seconds"`
	Rate       float64 `json:"rate"`
	P50Ms      float64 `json:"p50_ms"`
	P99Ms      float64 `json:"p99_ms"`
	CPUSeconds float64 `json:"cpu_seconds"`
	Size       uint64  `json:"size"`
}

func main() {
	dir := flag.String("dir", "", "empty directory for the log (required)")
	entries := flag.Int("entries", 20000, "entries to add in all")
	appenders := flag.Int("appenders", 64, "concurrent appenders")
	entrySize := flag.Int("entry-size", 200, "bytes per entry")
	flag.Parse()
	if *dir == "" || *entries < 1 || *appenders < 1 {
		fmt.Fprintln(os.Stderr, "usage: tessera -dir DIR [-entries N] [-appenders K] [-entry-size B]")
		os.Exit(2)
	}
	r, err := run(*dir, *entries, *appenders, *entrySize)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tessera: %v\n", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(r); err != nil {
		fmt.Fprintf(os.Stderr, "tessera: %v\n", err)
		os.Exit(1)
	}
}

func run(dir string, entries, appenders, entrySize int) (*result, error) {
	ctx := context.Background()
	skey, _, err := note.GenerateKey(rand.Reader, "bench.tessera.example")
	if err != nil {
		return nil, err
	}
	signer, err := note.NewSigner(skey)
	if err != nil {
		return nil, err
	}
	driver, err := posix.New(ctx, posix.Config{Path: dir})
	if err != nil {
		return nil, fmt.Errorf("posix storage: %w", err)
	}
	appender, shutdown, reader, err := tessera.NewAppender(ctx, driver, tessera.NewAppendOptions().
		WithCheckpointSigner(signer).
		WithCheckpointInterval(time.Second).
		WithBatching(1000, 5*time.Millisecond))
	if err != nil {
		return nil, fmt.Errorf("appender: %w", err)
	}

	per := entries / appenders
	total := per * appenders
	latencies := make([]time.Duration, total)
	errs := make(chan error, appenders)
	var wg sync.WaitGroup
	start := time.Now()
	for k := 0; k < appenders; k++ {
		wg.Add(1)
		go func(k int) {
			defer wg.Done()
			data := make([]byte, entrySize)
			for v := 0; v < per; v++ {
				// Distinct entries (the log would deduplicate identical ones with antispam).
				copy(data, fmt.Sprintf("rx-%d/%d ", k, v))
				t := time.Now()
				if _, err := appender.Add(ctx, tessera.NewEntry(append([]byte(nil), data...)))(); err != nil {
					errs <- fmt.Errorf("appender %d, entry %d: %w", k, v, err)
					return
				}
				latencies[k*per+v] = time.Since(t)
			}
		}(k)
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	size, err := reader.IntegratedSize(ctx)
	if err != nil {
		return nil, fmt.Errorf("integrated size: %w", err)
	}
	if err := shutdown(ctx); err != nil {
		return nil, fmt.Errorf("shutdown: %w", err)
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return nil, err
	}
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	pct := func(q float64) float64 {
		i := int(q * float64(len(latencies)))
		if i >= len(latencies) {
			i = len(latencies) - 1
		}
		return float64(latencies[i].Microseconds()) / 1000
	}
	cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	return &result{
		Entries:    total,
		Appenders:  appenders,
		Seconds:    elapsed.Seconds(),
		Rate:       float64(total) / elapsed.Seconds(),
		P50Ms:      pct(0.5),
		P99Ms:      pct(0.99),
		CPUSeconds: cpu.Seconds(),
		Size:       size,
	}, nil
}
