package node

import (
	"bufio"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/infermesh/infermesh/protocol"
)

// Accelerators returns the devices this machine computes on, as a capacity
// record lists them: its NVIDIA GPUs (name and total memory, read through
// NVML), then always its CPU (model name, cores, total RAM).
//
// A machine without NVIDIA's driver or library has zero GPUs, quietly. The
// CPU's model comes from /proc/cpuinfo and its memory from /proc/meminfo;
// where those do not exist (not Linux) the name falls back to the
// architecture and the memory to 0 (unknown). It never fails.
func Accelerators() []protocol.Accelerator {
	return append(nvidiaGPUs(nvmlLib), cpuAccelerator())
}

// nvmlLib is the NVML library Accelerators reads; it is loaded (dlopen) on
// each Init and unloaded on the matching Shutdown.
var nvmlLib = nvml.New()

// nvmlMu serialises Init..Shutdown sequences, so that one caller's Shutdown
// never unloads the library under another's queries.
var nvmlMu sync.Mutex

// nvidiaGPUs lists the GPUs lib sees. Shutdown is called exactly when Init
// succeeded; anything that goes wrong, a panic inside the bindings
// included, yields no GPUs rather than stopping the node.
func nvidiaGPUs(lib nvml.Interface) (gpus []protocol.Accelerator) {
	defer func() {
		if r := recover(); r != nil {
			slog.Debug("NVML panicked; reporting no GPUs", "panic", r)
			gpus = nil
		}
	}()
	nvmlMu.Lock()
	defer nvmlMu.Unlock()
	if ret := lib.Init(); ret != nvml.SUCCESS {
		if ret != nvml.ERROR_LIBRARY_NOT_FOUND {
			slog.Debug("NVML unavailable; reporting no GPUs", "err", nvmlError(ret))
		}
		return nil
	}
	defer func() {
		if ret := lib.Shutdown(); ret != nvml.SUCCESS {
			slog.Debug("NVML shutdown", "err", nvmlError(ret))
		}
	}()
	n, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		slog.Debug("NVML device count", "err", nvmlError(ret))
		return nil
	}
	for i := range n {
		dev, ret := lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			slog.Debug("NVML device handle", "index", i, "err", nvmlError(ret))
			continue
		}
		name, ret := dev.GetName()
		if ret != nvml.SUCCESS || strings.TrimSpace(name) == "" {
			name = "NVIDIA GPU"
		}
		var memory int64
		if mem, ret := dev.GetMemoryInfo(); ret == nvml.SUCCESS {
			memory = int64(mem.Total)
		}
		gpus = append(gpus, protocol.Accelerator{Kind: "gpu", Name: strings.TrimSpace(name), MemoryBytes: memory})
	}
	return gpus
}

// nvmlError names an NVML return code. Callers hold nvmlMu: go-nvml swaps
// the function that names codes when it loads or unloads the library.
func nvmlError(ret nvml.Return) string {
	return fmt.Sprintf("%s (%d)", ret.Error(), int32(ret))
}

// cpuAccelerator describes the CPU.
func cpuAccelerator() protocol.Accelerator {
	a := protocol.Accelerator{Kind: "cpu", Cores: runtime.NumCPU()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		a.Name = parseCPUModel(string(b))
	}
	if a.Name == "" {
		a.Name = runtime.GOARCH + " CPU"
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		a.MemoryBytes = parseMemTotal(string(b))
	}
	return a
}

// cpuModelKeys are the /proc/cpuinfo fields that name a CPU, best first:
// x86 and some ARM kernels write "model name", MIPS "cpu model", boards
// such as the Raspberry Pi "Model", POWER "cpu", old ARM kernels
// "Processor", and some ARM kernels only the board ("Hardware").
var cpuModelKeys = []string{"model name", "cpu model", "Model", "cpu", "Processor", "Hardware"}

// parseCPUModel returns the CPU's model name from the text of /proc/cpuinfo,
// runs of spaces collapsed, or "" when it names none.
func parseCPUModel(cpuinfo string) string {
	found := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(cpuinfo))
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		key = strings.TrimSpace(key)
		value = strings.Join(strings.Fields(value), " ")
		if _, seen := found[key]; !seen && value != "" {
			found[key] = value
		}
	}
	for _, k := range cpuModelKeys {
		if v := found[k]; v != "" {
			return v
		}
	}
	return ""
}

// parseMemTotal returns MemTotal in bytes from the text of /proc/meminfo
// (given in kB there), or 0 when absent or malformed.
func parseMemTotal(meminfo string) int64 {
	sc := bufio.NewScanner(strings.NewReader(meminfo))
	for sc.Scan() {
		key, value, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(key) != "MemTotal" {
			continue
		}
		f := strings.Fields(value)
		if len(f) == 0 || len(f) > 2 {
			return 0
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || n < 0 {
			return 0
		}
		unit := int64(1)
		if len(f) == 2 {
			switch strings.ToLower(f[1]) {
			case "kb":
				unit = 1 << 10
			case "mb":
				unit = 1 << 20
			case "gb":
				unit = 1 << 30
			default:
				return 0
			}
		}
		if n > (1<<63-1)/unit {
			return 0
		}
		return n * unit
	}
	return 0
}
