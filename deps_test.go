// Package infermesh_test holds repository-wide checks: the dependency arrows
// of DESIGN.md (protocol <- shards <- mesh <- node <- cmd, simulations beside
// node) and a package doc on every package.
package infermesh_test

import (
	"bufio"
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/infermesh/infermesh"

// allowed lists, for each top-level package tree, the trees of ours it may
// import. A tree may always import inside itself.
var allowed = map[string][]string{
	"protocol":    {},
	"shards":      {"protocol"},
	"mesh":        {"protocol", "shards"},
	"node":        {"protocol", "shards", "mesh"},
	"simulations": {"protocol", "shards", "mesh"},
	"cmd":         {"protocol", "shards", "mesh", "node", "simulations"},
}

// onlyImporter names packages that alone may import a third-party module.
var onlyImporter = map[string]string{
	"github.com/yalue/onnxruntime_go": module + "/shards",
}

type pkg struct {
	path, doc string
	imports   []string
}

func listPackages(t *testing.T) []pkg {
	t.Helper()
	// Imports, TestImports and XTestImports: tests must keep the arrows too.
	out, err := exec.Command("go", "list", "-f",
		"{{.ImportPath}}\t{{.Doc}}\t{{join .Imports \" \"}} {{join .TestImports \" \"}} {{join .XTestImports \" \"}}",
		"./...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.SplitN(sc.Text(), "\t", 3)
		pkgs = append(pkgs, pkg{path: f[0], doc: f[1], imports: strings.Fields(f[2])})
	}
	if len(pkgs) < 6 {
		t.Fatalf("go list found only %d packages", len(pkgs))
	}
	return pkgs
}

func tree(path string) string {
	rest := strings.TrimPrefix(path, module+"/")
	tree, _, _ := strings.Cut(rest, "/")
	return tree
}

func TestDependencyArrows(t *testing.T) {
	for _, p := range listPackages(t) {
		if p.path == module {
			continue // this test
		}
		from := tree(p.path)
		ok, known := allowed[from]
		if !known {
			t.Errorf("%s: top-level folder %q has no dependency rule; add it to deps_test.go and DESIGN", p.path, from)
			continue
		}
		for _, imp := range p.imports {
			if want, only := onlyImporter[imp]; only && p.path != want {
				t.Errorf("%s imports %s, which only %s may import", p.path, imp, want)
			}
			if !strings.HasPrefix(imp, module+"/") {
				continue
			}
			to := tree(imp)
			if to != from && !contains(ok, to) {
				t.Errorf("%s imports %s: %s may import only %v", p.path, imp, from, ok)
			}
		}
	}
}

func TestEveryPackageHasADoc(t *testing.T) {
	for _, p := range listPackages(t) {
		if p.doc == "" && p.path != module {
			t.Errorf("%s has no package doc comment", p.path)
		}
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
