package simulations

// The built-in scenarios: the YAML files of scenarios/, embedded so that
// `infermesh sim run churn` works from any directory.

import (
	"embed"
	"path"
	"slices"
	"strings"
)

//go:embed scenarios/*.yaml
var builtinFS embed.FS

// BuiltinNames lists the built-in scenarios, sorted: their file names
// without ".yaml".
func BuiltinNames() []string {
	ents, _ := builtinFS.ReadDir("scenarios")
	var names []string
	for _, e := range ents {
		if n, ok := strings.CutSuffix(e.Name(), ".yaml"); ok && !e.IsDir() {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return names
}

// Builtin returns the YAML of the built-in scenario name ("churn" or
// "churn.yaml").
func Builtin(name string) ([]byte, bool) {
	name = strings.TrimSuffix(name, ".yaml")
	if name == "" || strings.ContainsAny(name, `/\`) {
		return nil, false
	}
	data, err := builtinFS.ReadFile(path.Join("scenarios", name+".yaml"))
	return data, err == nil
}
