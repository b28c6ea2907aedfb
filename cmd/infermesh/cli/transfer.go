package cli

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/infermesh/infermesh/node"
)

func shardPublish(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard publish", "DIR [--data DIR | --api ADDR]",
		"Adds a local blocked model to the running node's store (every block verified) and announces the node\n"+
			"as its provider, so that peers can fetch it (`infermesh node --model ID`, `infermesh shard pull ID`).")
	data := fs.String("data", node.DefaultDataDir(), "data directory of the local node")
	api := fs.String("api", "", "the local node's API address")
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	c, err := nodeClient(*api, *data)
	if err != nil {
		return err
	}
	dir, err := filepath.Abs(pos[0])
	if err != nil {
		return err
	}
	resp, err := c.Publish(ctx, dir)
	if err != nil {
		return err
	}
	e.printf("published model %s (%s) in %.1f s\n", resp.Model, humanBytes(resp.Bytes), resp.Seconds)
	return nil
}

func shardPull(ctx context.Context, e *env, args []string) error {
	fs := newFlags(e, "infermesh shard pull", "MODEL_ID [--blocks START-END] [--data DIR | --api ADDR]",
		"Fetches a model's manifest and blocks from peers into the running node's store, verifying each block\n"+
			"against its CID, with a progress bar; the node then provides them too.")
	blocks := fs.String("blocks", "", "only these blocks, START-END inclusive (default: all)")
	data := fs.String("data", node.DefaultDataDir(), "data directory of the local node")
	api := fs.String("api", "", "the local node's API address")
	pos, err := parse(fs, args, 1, 1)
	if err != nil {
		return err
	}
	req := node.PullRequest{Model: pos[0]}
	if *blocks != "" {
		var a, b int
		if _, err := fmt.Sscanf(*blocks, "%d-%d", &a, &b); err != nil || a < 0 || b < a {
			return fmt.Errorf("--blocks %q: want START-END", *blocks)
		}
		req.Start, req.End = a, b+1
	}
	c, err := nodeClient(*api, *data)
	if err != nil {
		return err
	}
	start := time.Now()
	res, err := c.Pull(ctx, req, func(done, total int64) {
		fmt.Fprintf(e.stderr, "\r%s", progressBar(done, total, time.Since(start)))
	})
	fmt.Fprintln(e.stderr)
	if err != nil {
		return fmt.Errorf("pull: %w", err)
	}
	e.printf("pulled model %s: %s in %.1f s (%s/s)\n", res.Model, humanBytes(res.Bytes), res.Seconds,
		humanBytes(int64(float64(res.Bytes)/max(res.Seconds, 1e-3))))
	return nil
}

// progressBar renders "[=====>    ]  45.2 MiB / 98.0 MiB  120.0 MiB/s  ETA 1s".
func progressBar(done, total int64, elapsed time.Duration) string {
	const width = 30
	frac := 0.0
	if total > 0 {
		frac = min(1, float64(done)/float64(total))
	}
	fill := int(frac * width)
	bar := strings.Repeat("=", fill)
	if fill < width {
		bar += ">" + strings.Repeat(" ", width-fill-1)
	}
	rate := float64(done) / max(elapsed.Seconds(), 1e-3)
	eta := "?"
	if rate > 0 && total >= done {
		eta = (time.Duration(float64(total-done) / rate * float64(time.Second))).Round(time.Second).String()
	}
	return fmt.Sprintf("[%s] %s / %s  %s/s  ETA %s   ", bar, humanBytes(done), humanBytes(total), humanBytes(int64(rate)), eta)
}
