package node

import (
	"runtime"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

func TestAcceleratorsCPULast(t *testing.T) {
	accs := Accelerators()
	if len(accs) == 0 {
		t.Fatal("no accelerators: the CPU is always listed")
	}
	for _, a := range accs[:len(accs)-1] {
		if a.Kind != "gpu" || a.Name == "" || a.MemoryBytes <= 0 {
			t.Errorf("implausible GPU %+v", a)
		}
	}
	cpu := accs[len(accs)-1]
	t.Logf("accelerators: %+v", accs)
	if cpu.Kind != "cpu" || cpu.Name == "" || cpu.Cores < 1 {
		t.Errorf("implausible CPU %+v", cpu)
	}
	if runtime.GOOS == "linux" && cpu.MemoryBytes <= 0 {
		t.Errorf("CPU memory %d on Linux", cpu.MemoryBytes)
	}
	// Twice in a row: Init and Shutdown pair up, so a second call works too.
	if again := Accelerators(); len(again) != len(accs) {
		t.Errorf("second call found %d accelerators, first %d", len(again), len(accs))
	}
}

// fakeNVML is a mock library that counts Init and Shutdown.
func fakeNVML(initRet nvml.Return, devices []*mock.Device, inits, shutdowns *int) *mock.Interface {
	return &mock.Interface{
		InitFunc:     func() nvml.Return { *inits++; return initRet },
		ShutdownFunc: func() nvml.Return { *shutdowns++; return nvml.SUCCESS },
		DeviceGetCountFunc: func() (int, nvml.Return) {
			return len(devices), nvml.SUCCESS
		},
		DeviceGetHandleByIndexFunc: func(i int) (nvml.Device, nvml.Return) {
			if i < 0 || i >= len(devices) || devices[i] == nil {
				return nil, nvml.ERROR_INVALID_ARGUMENT
			}
			return devices[i], nvml.SUCCESS
		},
	}
}

func gpu(name string, total uint64) *mock.Device {
	return &mock.Device{
		GetNameFunc:       func() (string, nvml.Return) { return name, nvml.SUCCESS },
		GetMemoryInfoFunc: func() (nvml.Memory, nvml.Return) { return nvml.Memory{Total: total}, nvml.SUCCESS },
	}
}

func TestNvidiaGPUs(t *testing.T) {
	const h100 = 85520809984
	noMemory := &mock.Device{
		GetNameFunc:       func() (string, nvml.Return) { return "", nvml.ERROR_UNKNOWN },
		GetMemoryInfoFunc: func() (nvml.Memory, nvml.Return) { return nvml.Memory{}, nvml.ERROR_NOT_SUPPORTED },
	}
	for _, c := range []struct {
		name          string
		init          nvml.Return
		devices       []*mock.Device
		want          []string // names
		wantShutdowns int
	}{
		{"no library", nvml.ERROR_LIBRARY_NOT_FOUND, []*mock.Device{gpu("x", 1)}, nil, 0},
		{"no driver", nvml.ERROR_DRIVER_NOT_LOADED, []*mock.Device{gpu("x", 1)}, nil, 0},
		{"no devices", nvml.SUCCESS, nil, nil, 1},
		{"two GPUs", nvml.SUCCESS, []*mock.Device{gpu("NVIDIA H100 80GB HBM3", h100), gpu(" NVIDIA L4 ", 1<<34)},
			[]string{"NVIDIA H100 80GB HBM3", "NVIDIA L4"}, 1},
		{"a lost handle is skipped", nvml.SUCCESS, []*mock.Device{nil, gpu("NVIDIA A10", 1<<34)}, []string{"NVIDIA A10"}, 1},
		{"unnamed, no memory info", nvml.SUCCESS, []*mock.Device{noMemory}, []string{"NVIDIA GPU"}, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			var inits, shutdowns int
			got := nvidiaGPUs(fakeNVML(c.init, c.devices, &inits, &shutdowns))
			if inits != 1 || shutdowns != c.wantShutdowns {
				t.Errorf("Init called %d times, Shutdown %d; want 1 and %d", inits, shutdowns, c.wantShutdowns)
			}
			if len(got) != len(c.want) {
				t.Fatalf("got %+v, want names %q", got, c.want)
			}
			for i, a := range got {
				if a.Kind != "gpu" || a.Name != c.want[i] {
					t.Errorf("GPU %d: %+v, want name %q", i, a, c.want[i])
				}
			}
			if c.name == "two GPUs" && got[0].MemoryBytes != h100 {
				t.Errorf("memory %d, want %d", got[0].MemoryBytes, int64(h100))
			}
		})
	}
}

func TestNvidiaGPUsPanicIsNoGPUs(t *testing.T) {
	var shutdowns int
	lib := &mock.Interface{
		InitFunc:           func() nvml.Return { return nvml.SUCCESS },
		ShutdownFunc:       func() nvml.Return { shutdowns++; return nvml.SUCCESS },
		DeviceGetCountFunc: func() (int, nvml.Return) { panic("symbol not found") },
	}
	if got := nvidiaGPUs(lib); got != nil {
		t.Errorf("got %+v after a panic, want none", got)
	}
	if shutdowns != 1 {
		t.Errorf("Shutdown called %d times after a successful Init, want 1", shutdowns)
	}
	// The lock was released.
	if got := nvidiaGPUs(fakeNVML(nvml.SUCCESS, []*mock.Device{gpu("g", 1)}, new(int), new(int))); len(got) != 1 {
		t.Errorf("after a panic: got %+v", got)
	}
}

func TestParseCPUModel(t *testing.T) {
	for _, c := range []struct{ name, text, want string }{
		{"x86", "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 106\nmodel name\t: Intel(R) Xeon(R) Processor\nstepping\t: 6\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n",
			"Intel(R) Xeon(R) Processor"},
		{"x86 padded", "model name\t: Intel(R) Xeon(R) CPU           E5-2680 v4 @ 2.40GHz\n", "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz"},
		{"amd", "vendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7R13 Processor\n", "AMD EPYC 7R13 Processor"},
		{"raspberry pi", "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd08\n\nHardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n",
			"Raspberry Pi 4 Model B Rev 1.1"},
		{"power", "processor\t: 0\ncpu\t\t: POWER9, altivec supported\nclock\t\t: 3800.000000MHz\n", "POWER9, altivec supported"},
		{"old arm", "Processor\t: ARMv7 Processor rev 4 (v7l)\nprocessor\t: 0\n", "ARMv7 Processor rev 4 (v7l)"},
		{"arm64 server, no name", "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n", ""},
		{"empty value skipped", "model name\t:\nmodel name\t: Real Name\n", "Real Name"},
		{"empty", "", ""},
		{"garbage", "\x00\x01 no colons here\n", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := parseCPUModel(c.text); got != c.want {
				t.Errorf("got %q, want %q", got, c.want)
			}
		})
	}
}

func TestParseMemTotal(t *testing.T) {
	for _, c := range []struct {
		name, text string
		want       int64
	}{
		{"linux", "MemTotal:       24684084 kB\nMemFree:        23559760 kB\nMemAvailable:   24279088 kB\n", 24684084 << 10},
		{"not first", "MemFree: 1 kB\nMemTotal: 2048 kB\n", 2 << 20},
		{"no unit", "MemTotal: 4096\n", 4096},
		{"missing", "MemFree: 1 kB\n", 0},
		{"not a number", "MemTotal: lots kB\n", 0},
		{"negative", "MemTotal: -5 kB\n", 0},
		{"unknown unit", "MemTotal: 5 pages\n", 0},
		{"overflow", "MemTotal: 9223372036854775807 kB\n", 0},
		{"empty", "", 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := parseMemTotal(c.text); got != c.want {
				t.Errorf("got %d, want %d", got, c.want)
			}
		})
	}
}
