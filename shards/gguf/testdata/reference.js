// reference.js parses GGUF files with @huggingface/gguf, an independent
// reader, for gguf's tests. Usage:
//   NODE_PATH=<node_modules> node reference.js <file.gguf>...
// Prints a JSON array, one entry per file: {version, dataOffset, metadata:
// {key: {type, subType, value}}, tensors: [{name, shape, dtype, offset}]}.
// 64-bit integers (BigInt in JavaScript) are printed as decimal strings;
// shape is in ggml order, as the file stores it.
const { gguf } = require("@huggingface/gguf");

// Keys @huggingface/gguf adds to the metadata from the header.
const headerKeys = new Set(["version", "tensor_count", "kv_count"]);

const plain = (v) =>
  typeof v === "bigint" ? v.toString() : Array.isArray(v) ? v.map(plain) : v;

(async () => {
  const out = [];
  for (const file of process.argv.slice(2)) {
    const r = await gguf(file, { allowLocalFile: true, typedMetadata: true });
    const metadata = {};
    for (const [key, e] of Object.entries(r.typedMetadata)) {
      if (headerKeys.has(key)) continue;
      metadata[key] = { type: e.type, subType: e.subType ?? null, value: plain(e.value) };
    }
    out.push({
      version: r.metadata.version,
      dataOffset: r.tensorDataOffset.toString(),
      metadata,
      tensors: r.tensorInfos.map((t) => ({
        name: t.name,
        shape: t.shape.map(plain),
        dtype: t.dtype,
        offset: t.offset.toString(),
      })),
    });
  }
  process.stdout.write(JSON.stringify(out));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
