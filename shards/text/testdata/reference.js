// reference.js encodes and decodes a corpus with @lenml/tokenizers (a
// transformers.js port) for text's tests. Usage:
//   NODE_PATH=<node_modules> node reference.js <job.json> <out.json>
// job.json: {"models": {"name": {"tokenizer": path, "config": path,
// "ids": [[id, ...], ...]}}, "corpus": path}; the corpus file is a JSON
// array of strings. Output, per model and string: e0/e1 = encode
// without/with special tokens, d00/d01 = decode(e0) keeping/skipping special
// tokens, d10/d11 = the same for e1. Under "name#ids", per id list of the
// model: d0/d1 = its decode keeping/skipping special tokens.
const fs = require("fs");
const { TokenizerLoader } = require("@lenml/tokenizers");

const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const corpus = JSON.parse(fs.readFileSync(job.corpus, "utf8"));
const out = {};
for (const [name, m] of Object.entries(job.models)) {
  const tok = TokenizerLoader.fromPreTrained({
    tokenizerJSON: JSON.parse(fs.readFileSync(m.tokenizer, "utf8")),
    tokenizerConfig: JSON.parse(fs.readFileSync(m.config, "utf8")),
  });
  // decode refuses an empty list; Hugging Face decodes it to "".
  const dec = (ids, skip) =>
    ids.length === 0 ? "" : tok.decode(ids, { skip_special_tokens: skip });
  out[name] = corpus.map((s) => {
    const e0 = tok.encode(s, { add_special_tokens: false });
    const e1 = tok.encode(s, { add_special_tokens: true });
    return {
      e0,
      e1,
      d00: dec(e0, false),
      d01: dec(e0, true),
      d10: dec(e1, false),
      d11: dec(e1, true),
    };
  });
  out[name + "#ids"] = (m.ids || []).map((ids) => ({
    d0: dec(ids, false),
    d1: dec(ids, true),
  }));
}
fs.writeFileSync(process.argv[3], JSON.stringify(out));
