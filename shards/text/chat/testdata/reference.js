// Renders chat templates with @lenml/tokenizers (a transformers.js port),
// the reference for reference_test.go: its apply_chat_template builds the
// template's variables (messages, add_generation_prompt, special tokens,
// extra keyword arguments) as transformers.js does. The Jinja engine it
// bundles, @huggingface/jinja 0.2.2, cannot parse slices such as
// messages[::-1], so the compiled template is taken from a newer
// @huggingface/jinja installed beside it. That engine also ignores the
// argument of str.strip/lstrip/rstrip (Qwen 3 strips only "\n" around
// <think> blocks, where it trims all whitespace); patchStrip gives them
// Python's meaning, which transformers (Python jinja2) renders.
//
// Usage: node reference.js NODE_MODULES INPUT.json, where INPUT is
// {"tokenizer": path, "config": path, "cases": [{"messages",
// "add_generation_prompt", "extra"}]}. It prints a JSON list with, per case,
// {"text": prompt} or {"error": message}.
const fs = require("fs");
const path = require("path");

// patchStrip makes the engine's string methods strip, lstrip and rstrip
// take Python's optional argument: the set of characters to remove.
function patchStrip(Environment) {
  const env = new Environment();
  env.set("s", "");
  const proto = Object.getPrototypeOf(env.lookupVariable("s"));
  const desc = Object.getOwnPropertyDescriptor(proto, "builtins");
  if (!desc || !desc.get) throw new Error("@huggingface/jinja: StringValue.builtins not found");
  const strip = (s, chars, left, right) => {
    let i = 0;
    let j = s.length;
    if (chars === undefined || chars === null) {
      if (left) s = s.trimStart();
      if (right) s = s.trimEnd();
      return s;
    }
    while (left && i < j && chars.includes(s[i])) i++;
    while (right && j > i && chars.includes(s[j - 1])) j--;
    return s.slice(i, j);
  };
  Object.defineProperty(proto, "builtins", {
    get() {
      const m = desc.get.call(this);
      if (!m.__pythonStrip) {
        const FunctionValue = m.get("strip").constructor;
        const StringValue = this.constructor;
        const value = this.value;
        for (const [name, left, right] of [["strip", true, true], ["lstrip", true, false], ["rstrip", false, true]]) {
          m.set(name, new FunctionValue((args) => {
            const a = args && args.length > 0 ? args[0].value : undefined;
            return new StringValue(strip(value, a, left, right));
          }));
        }
        m.__pythonStrip = true;
      }
      return m;
    },
  });
}

async function main() {
  const [modules, input] = process.argv.slice(2);
  const { TokenizerLoader } = require(path.join(modules, "@lenml", "tokenizers"));
  const { Template, Environment } = await import(require.resolve("@huggingface/jinja", { paths: [modules] }));
  patchStrip(Environment);
  const req = JSON.parse(fs.readFileSync(input, "utf8"));
  const tokenizer = TokenizerLoader.fromPreTrained({
    tokenizerJSON: JSON.parse(fs.readFileSync(req.tokenizer, "utf8")),
    tokenizerConfig: JSON.parse(fs.readFileSync(req.config, "utf8")),
  });
  const source = tokenizer.get_chat_template({ chat_template: null, tools: null });
  tokenizer._compiled_template_cache.set(source, new Template(source));
  const out = req.cases.map((c) => {
    try {
      return {
        text: tokenizer.apply_chat_template(c.messages, {
          tokenize: false,
          add_generation_prompt: c.add_generation_prompt,
          ...(c.extra || {}),
        }),
      };
    } catch (e) {
      return { error: String(e && e.message ? e.message : e) };
    }
  });
  process.stdout.write(JSON.stringify(out));
}

main().catch((e) => {
  process.stderr.write(String(e && e.stack ? e.stack : e));
  process.exit(1);
});
