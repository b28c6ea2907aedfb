// Command infermesh is the one binary of infermesh: the node daemon, its
// tools for model shards, and the simulator. Everything lives in package cli.
package main

import (
	"os"

	"github.com/infermesh/infermesh/cmd/infermesh/cli"
)

func main() { os.Exit(cli.Run(os.Args[1:], os.Stdout, os.Stderr)) }
