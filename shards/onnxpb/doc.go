// Package onnxpb is the ONNX protobuf schema (onnx-ml.proto, ONNX 1.12, IR 8)
// compiled to Go. It is generated, committed so builds need no protoc, and
// the only ONNX protobuf package in the binary (two would clash in the
// protobuf registry). Regenerate with `go generate ./shards/onnxpb` after
// installing protoc (Debian protobuf-compiler) and protoc-gen-go.
package onnxpb

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go_opt=Monnx-ml.proto=github.com/infermesh/infermesh/shards/onnxpb onnx-ml.proto
