package cli

import (
	"context"
	"errors"
)

func shardSplit(_ context.Context, _ *env, _ []string) error {
	return errors.New("shard split: not wired yet")
}
