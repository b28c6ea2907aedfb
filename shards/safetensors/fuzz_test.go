package safetensors

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// FuzzReadHeader feeds arbitrary files to the header parser: it must never
// panic, and whatever it accepts must describe tensors inside the file that
// tile the data section, and re-encode to a header that parses the same.
func FuzzReadHeader(f *testing.F) {
	f.Add(binary.LittleEndian.AppendUint64(nil, 2), []byte("{}"))
	f.Add([]byte{}, []byte(`{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`+"\x00\x00\x80\x3f\x00\x00\x00\xc0"))
	f.Add([]byte{}, []byte(`{"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},"a":{"dtype":"BF16","shape":[1,1],"data_offsets":[0,2]}}abc`))
	f.Add([]byte{}, []byte(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{}}`))
	f.Fuzz(func(t *testing.T, prefix, body []byte) {
		file := prefix
		if len(prefix) != 8 {
			// Most inputs get a length prefix covering the JSON object.
			end := bytes.LastIndexByte(body, '}') + 1
			file = binary.LittleEndian.AppendUint64(nil, uint64(end))
		}
		file = append(file, body...)
		h, err := readHeader("fuzz", bytes.NewReader(file), int64(len(file)))
		if err != nil {
			return
		}
		dataStart := 8 + int64(binary.LittleEndian.Uint64(file))
		var total int64
		infos := make([]Info, 0, len(h.tensors))
		byOff := append([]entry(nil), h.tensors...)
		for _, e := range h.tensors {
			if e.off < dataStart || e.off+e.Size > int64(len(file)) || e.Size < 0 {
				t.Fatalf("tensor %q at [%d, +%d) outside the data of a %d-byte file", e.Name, e.off, e.Size, len(file))
			}
			total += e.Size
		}
		if total != int64(len(file))-dataStart {
			t.Fatalf("tensors cover %d of %d data bytes", total, int64(len(file))-dataStart)
		}
		// Re-encode in data order; the result must parse to the same tensors.
		for i := 1; i < len(byOff); i++ {
			for j := i; j > 0 && (byOff[j].off < byOff[j-1].off || byOff[j].off == byOff[j-1].off && byOff[j].Size < byOff[j-1].Size); j-- {
				byOff[j], byOff[j-1] = byOff[j-1], byOff[j]
			}
		}
		for _, e := range byOff {
			infos = append(infos, e.Info)
		}
		hdr, err := EncodeHeader(infos, h.metadata)
		if err != nil {
			t.Fatalf("re-encoding an accepted header: %v", err)
		}
		again := append(hdr, file[dataStart:]...)
		h2, err := readHeader("again", bytes.NewReader(again), int64(len(again)))
		if err != nil {
			t.Fatalf("re-encoded header refused: %v", err)
		}
		if len(h2.tensors) != len(h.tensors) || len(h2.metadata) != len(h.metadata) {
			t.Fatalf("re-encoded header differs")
		}
		for i, e := range h2.tensors {
			if e.Name != byOff[i].Name || e.off-int64(len(hdr)) != byOff[i].off-dataStart || e.Size != byOff[i].Size {
				t.Fatalf("tensor %d: %+v vs %+v", i, e, byOff[i])
			}
		}
	})
}
