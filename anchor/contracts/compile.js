// Compile AnchorRegistry.sol with solc-js (the version pinned in
// package.json) into a Foundry-style artifact: { abi, bytecode.object,
// deployedBytecode.object } plus the compiler settings. Deterministic:
// the same source and compiler give the same bytes.
//
//   node compile.js OUT.json
//
// Run through scripts/compile-contract, which installs solc-js and, with
// --check, fails if the committed artifact differs.
'use strict';
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const out = process.argv[2];
if (!out) {
  console.error('usage: node compile.js OUT.json');
  process.exit(2);
}
const file = 'AnchorRegistry.sol';
const settings = {
  optimizer: { enabled: true, runs: 10000 },
  evmVersion: 'cancun',
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
};
const input = {
  language: 'Solidity',
  sources: { [file]: { content: fs.readFileSync(path.join(__dirname, file), 'utf8') } },
  settings,
};
const res = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (res.errors || []).filter((e) => e.severity === 'error');
for (const e of res.errors || []) console.error(e.formattedMessage);
if (errors.length) process.exit(1);
const c = res.contracts[file].AnchorRegistry;
const artifact = {
  contractName: 'AnchorRegistry',
  compiler: { solc: solc.version(), optimizer: settings.optimizer, evmVersion: settings.evmVersion },
  abi: c.abi,
  bytecode: { object: '0x' + c.evm.bytecode.object },
  deployedBytecode: { object: '0x' + c.evm.deployedBytecode.object },
};
fs.writeFileSync(out, JSON.stringify(artifact, null, 2) + '\n');
