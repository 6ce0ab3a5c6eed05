// The /audit page: verifies rxledger proof bundles in the browser, with WebCrypto only.
//
// A bundle is {"leaf", "leafIndex", "treeSize", "inclusionPath", "checkpoint"} (DESIGN.md,
// "Formats auditors rely on"). Each bundle goes through CHECKS in order, then QUORUM_CHECK when
// witness keys are given, and stops at the first that fails; then the bundles' leaves (event
// headers) are laid out as a timeline and the hash chain of each prescription (every version's
// `prev` is the previous version's leaf hash) is checked. Everything read from a bundle reaches
// the page through textContent, never as HTML.
//
// The key field takes one verifier key or a key set (after a key rotation): one key a line,
// each optionally followed by the checkpoint sizes it signs, `first..` or `first..last`
// (anchoring/keys.py). A checkpoint counts when a key in force at its size signed it.

const CHECKS = [
  { short: "bundle", title: "Bundle parses" },
  { short: "key", title: "Verifier key parses and its key ID matches" },
  { short: "signature", title: "Checkpoint is signed by the verifier key" },
  { short: "size", title: "Checkpoint size equals treeSize" },
  { short: "root", title: "Root rebuilt from the leaf and inclusion path equals the checkpoint root" },
];
const QUORUM_CHECK = { short: "quorum", title: "Witness quorum: enough of the witness keys cosigned the checkpoint" };
const HASH_SIZE = 32;
const SIG_PREFIX = "\u2014 "; // em dash and a space
const ALG_ED25519 = 0x01;
const ALG_COSIGNATURE_V1 = 0x04;
const KEY_KINDS = { [ALG_ED25519]: "a log's verifier key", [ALG_COSIGNATURE_V1]: "a witness key" };
const COSIGNATURE_BYTES = 4 + 8 + 64; // key ID, big-endian UNIX time, Ed25519 signature
const MAX_TIMESTAMP = (1n << 63n) - 1n;
const MAX_DATE_MS = 8.64e15; // the last instant a JavaScript Date holds
const KEY_SEPARATORS = /[\s,]+/;
const MAX_FILE_BYTES = 4 << 20;
const VERIFIER_KEY_SHAPE = /^[^\s+]+\+[0-9A-Fa-f]{8}\+[A-Za-z0-9+/]+=*$/;
const STRICT_BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const DECIMAL = /^(?:0|[1-9][0-9]*)$/;
const KEY_RANGE = /^(0|[1-9][0-9]*)\.\.(0|[1-9][0-9]*)?$/;
const COMMENT = /(^|\s)#.*$/;
const MARK = { passed: "\u2713", failed: "\u2717", pending: "\u2026", skipped: "\u2013" };
const WORD = { passed: "passed", failed: "failed", pending: "checking", skipped: "not run" };

/** A check failed; `detail` says what was expected and what was found. */
class CheckFailed extends Error {}

function fail(detail) {
  throw new CheckFailed(detail);
}

// --- bytes, base64, hashes --------------------------------------------------------------

const utf8 = (text) => new TextEncoder().encode(text);

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function equalBytes(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

function b64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/** Strict standard base64 (padded, no whitespace, no stray bits), as the CLI reads it. */
function unb64(text, what) {
  if (typeof text !== "string") fail(`${what} must be a base64 string, got ${kindOf(text)}`);
  if (!STRICT_BASE64.test(text)) {
    fail(`${what} is not strict base64 (standard alphabet, padded, no spaces or line breaks)`);
  }
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  if (b64(bytes) !== text) fail(`${what} is non-canonical base64 (stray bits in its last character)`);
  return bytes;
}

function kindOf(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "string") return `the string ${quote(value)}`;
  if (typeof value === "object") return "an object";
  return `${typeof value} ${String(value)}`;
}

function quote(text, max = 60) {
  const shown = JSON.stringify(text);
  return shown.length > max ? `${shown.slice(0, max - 1)}\u2026"` : shown;
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

/** RFC 9162 §2.1.1: the hash of a leaf, SHA-256(0x00 ‖ leaf). */
const leafHash = (leaf) => sha256(concat(Uint8Array.of(0x00), leaf));

/** RFC 9162 §2.1.1: the hash of an interior node, SHA-256(0x01 ‖ left ‖ right). */
const nodeHash = (left, right) => sha256(concat(Uint8Array.of(0x01), left, right));

// --- check 1: the bundle ------------------------------------------------------------------

function integerField(bundle, name) {
  const value = bundle[name];
  if (!Number.isSafeInteger(value) || value < 0) {
    fail(`field "${name}" must be a non-negative integer, got ${kindOf(value)}`);
  }
  return value;
}

/** The fields of a proof bundle, decoded; fails on a missing or ill-typed field. */
function parseBundle(bundle) {
  if (typeof bundle !== "object" || bundle === null || Array.isArray(bundle)) {
    fail(`a proof bundle must be a JSON object, got ${kindOf(bundle)}`);
  }
  for (const name of ["leaf", "leafIndex", "treeSize", "inclusionPath", "checkpoint"]) {
    if (!(name in bundle)) fail(`missing field "${name}"`);
  }
  const leaf = unb64(bundle.leaf, 'field "leaf"');
  const leafIndex = integerField(bundle, "leafIndex");
  const treeSize = integerField(bundle, "treeSize");
  if (!Array.isArray(bundle.inclusionPath)) {
    fail(`field "inclusionPath" must be an array of base64 hashes, got ${kindOf(bundle.inclusionPath)}`);
  }
  const path = bundle.inclusionPath.map((item, i) => {
    const hash = unb64(item, `inclusionPath[${i}]`);
    if (hash.length !== HASH_SIZE) fail(`inclusionPath[${i}] is ${hash.length} bytes, want ${HASH_SIZE}`);
    return hash;
  });
  if (typeof bundle.checkpoint !== "string") {
    fail(`field "checkpoint" must be the signed note text, got ${kindOf(bundle.checkpoint)}`);
  }
  return { leaf, leafIndex, treeSize, path, checkpoint: bundle.checkpoint };
}

// --- check 2: the verifier key ------------------------------------------------------------

/** C2SP signed-note key ID: SHA-256(name ‖ 0x0A ‖ alg ‖ public key)[:4]. */
async function keyId(name, alg, publicKey) {
  return (await sha256(concat(utf8(name), Uint8Array.of(0x0a, alg), publicKey))).subarray(0, 4);
}

/** "<name>+<8 hex key ID>+<base64(alg ‖ 32-byte Ed25519 key)>", with its key ID checked;
 * `what` names the key in errors. Requires `text` trimmed. */
async function parseKey(text, alg, what) {
  const first = text.indexOf("+");
  const second = text.indexOf("+", first + 1);
  if (first < 0 || second < 0) fail(`${what} must read <name>+<8 hex key ID>+<base64 key>`);
  const name = text.slice(0, first);
  const idHex = text.slice(first + 1, second);
  if (!name || /[\s+\u0000-\u001f\u007f]/.test(name)) {
    fail(`${what} name ${quote(name)} must be non-empty printable text without "+" or spaces`);
  }
  if (!/^[0-9A-Fa-f]{8}$/.test(idHex)) fail(`${what} ID must be 8 hex digits, got ${quote(idHex)}`);
  const raw = unb64(text.slice(second + 1), what);
  if (raw.length !== 33 || raw[0] !== alg) {
    const kind = raw.length === 33 && KEY_KINDS[raw[0]] ? ` (${KEY_KINDS[raw[0]]})` : "";
    fail(`${what} must be 0x${hex([alg])} followed by a 32-byte Ed25519 key, got ${raw.length} bytes starting 0x${hex(raw.subarray(0, 1))}${kind}`);
  }
  const publicKey = raw.slice(1);
  const id = await keyId(name, alg, publicKey);
  if (hex(id) !== idHex.toLowerCase()) {
    fail(`${what} ID does not match the key: the key reads ${idHex}, the key's ID is ${hex(id)}`);
  }
  let key;
  try {
    key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
  } catch (err) {
    if (err.name === "NotSupportedError") {
      fail("this browser's WebCrypto has no Ed25519: use a current Chromium, Firefox or Safari");
    }
    fail(`${what} is not a valid Ed25519 public key (${err.message})`);
  }
  return { name, id, idHex: hex(id), key };
}

/** The log's keys: lines of "<name>+<8 hex key ID>+<base64(0x01 ‖ 32-byte Ed25519 key)>",
 * each optionally followed by the sizes it signs ("first.." or "first..last"; none: all). */
async function parseVerifierKeys(text) {
  const lines = text.split("\n").map((line) => line.replace(COMMENT, "").trim());
  const numbered = lines.map((line, i) => [i + 1, line]).filter(([, line]) => line);
  if (!numbered.length) fail("no verifier key given: paste the log's key or drop its verifier.key file");
  const keys = [];
  for (const [number, line] of numbered) {
    const where = numbered.length > 1 ? `line ${number}: ` : "";
    const fields = line.split(/\s+/);
    if (fields.length > 2) fail(`${where}a key line must read <verifier key> [<first>..[<last>]]`);
    let key;
    try {
      key = await parseKey(fields[0], ALG_ED25519, "verifier key");
    } catch (err) {
      if (err instanceof CheckFailed && where) fail(where + err.message);
      throw err;
    }
    let first = 0;
    let last = null;
    if (fields.length === 2) {
      const range = fields[1].match(KEY_RANGE);
      if (!range) fail(`${where}key range ${quote(fields[1])} must read <first>.. or <first>..<last>`);
      first = Number(range[1]);
      last = range[2] === undefined ? null : Number(range[2]);
      if (last !== null && last < first) fail(`${where}key range ${fields[1]} must have first <= last`);
    }
    const label = `${key.name}+${key.idHex}`;
    if (keys.some((k) => k.label === label)) fail(`${where}key ${label} is listed twice`);
    keys.push({ ...key, label, first, last, sizes: `${first}..${last ?? ""}` });
  }
  return keys;
}

const covers = (key, size) => key.first <= size && (key.last === null || size <= key.last);

// --- check 3: the signed checkpoint ---------------------------------------------------------

/** C2SP signed-note: the signed text (up to the blank line) and its signature lines. */
function splitNote(note) {
  const sep = note.lastIndexOf("\n\n");
  if (sep < 0 || !note.endsWith("\n")) {
    fail("checkpoint note must be text, a blank line and signature lines, ending in a newline");
  }
  const control = note.match(/[\u0000-\u0009\u000b-\u001f\u007f]/);
  if (control) {
    fail(`checkpoint note contains control character U+${control[0].charCodeAt(0).toString(16).padStart(4, "0")}`);
  }
  const text = note.slice(0, sep + 1);
  const lines = note.slice(sep + 2).split("\n").slice(0, -1);
  if (!lines.length) fail("checkpoint note has no signature lines");
  const signatures = lines.map((line, i) => {
    const where = `checkpoint signature line ${i + 1}`;
    if (!line.startsWith(SIG_PREFIX)) fail(`${where} must start with an em dash and a space: ${quote(line)}`);
    const rest = line.slice(SIG_PREFIX.length);
    const space = rest.indexOf(" ");
    const name = rest.slice(0, space);
    const encoded = rest.slice(space + 1);
    if (space <= 0 || encoded.includes(" ")) fail(`${where} must read "— <key name> <base64>": ${quote(line)}`);
    const raw = unb64(encoded, where);
    if (raw.length < 5) fail(`${where} holds ${raw.length} bytes, too few for a key ID and a signature`);
    return { name, id: raw.subarray(0, 4), signature: raw.subarray(4) };
  });
  return { text, signatures };
}

/** C2SP tlog-checkpoint: origin, tree size, base64 root hash, then optional extension lines. */
function parseCheckpoint(text) {
  const lines = text.split("\n");
  if (lines.length < 4) fail("checkpoint text must have origin, size and root hash lines");
  const [origin, size, root] = lines;
  if (!origin) fail("checkpoint origin line is empty");
  if (!DECIMAL.test(size) || !Number.isSafeInteger(Number(size))) {
    fail(`checkpoint size ${quote(size)} is not a decimal number`);
  }
  const rootHash = unb64(root, "checkpoint root hash");
  if (rootHash.length !== HASH_SIZE) fail(`checkpoint root hash is ${rootHash.length} bytes, want ${HASH_SIZE}`);
  if (lines.slice(3, -1).some((line) => !line)) fail("checkpoint extension lines must not be empty");
  return { origin, size: Number(size), rootHash };
}

/** The checkpoint, once a signature by one of `keys` in force at its size verifies;
 * signatures by other keys are ignored here (the note's text and signature lines are kept for
 * the witness quorum). `signers` are the keys whose signatures count. */
async function openCheckpoint(note, keys) {
  const { text, signatures } = splitNote(note);
  const own = [];
  for (const s of signatures) {
    const key = keys.find((k) => s.name === k.name && equalBytes(s.id, k.id));
    if (key) own.push([s, key]);
  }
  const others = signatures.length - own.length;
  if (!own.length) {
    const seen = signatures.map((s) => `${s.name}+${hex(s.id)}`).join(", ");
    const wanted = keys.map((k) => k.label).join(", ");
    fail(`no signature by this key: the checkpoint is not signed by ${wanted} (its signatures are by ${seen})`);
  }
  for (const [s, key] of own) {
    const valid = s.signature.length === 64
      && await crypto.subtle.verify("Ed25519", key.key, s.signature, utf8(text));
    if (!valid) {
      fail(`the signature by ${key.label} does not verify: the checkpoint text is not what the key signed`);
    }
  }
  const checkpoint = parseCheckpoint(text);
  const signers = own.map(([, key]) => key).filter((key) => covers(key, checkpoint.size));
  if (!signers.length) {
    const found = own.map(([, key]) => `${key.label} (sizes ${key.sizes})`).join(", ");
    fail(`key out of range: the checkpoint of size ${checkpoint.size} is signed only by ${found}: no key in force at that size signed it`);
  }
  return { ...checkpoint, others, text, signatures, signers };
}

// --- checks 4 and 5: the tree ---------------------------------------------------------------

const bitLength = (n) => (n === 0n ? 0 : n.toString(2).length);
const popCount = (n) => n.toString(2).split("1").length - 1;

/** RFC 9162 inclusion path length: inner (below the split) plus border (right edge). */
function inclusionPathLength(index, size) {
  const inner = bitLength(index ^ (size - 1n));
  return inner + popCount(index >> BigInt(inner));
}

/** RFC 9162 §2.1.3.2: the root implied by a leaf hash and its inclusion path (BigInt: sizes
 * may exceed the 32 bits JavaScript's bit operators keep). */
async function rootFromInclusionPath(leafIndex, treeSize, hash, path) {
  if (leafIndex >= treeSize) {
    fail(`leafIndex ${leafIndex} is out of range: it must be less than treeSize ${treeSize}`);
  }
  const want = inclusionPathLength(BigInt(leafIndex), BigInt(treeSize));
  const where = `for leaf ${leafIndex} in a tree of ${treeSize}`;
  let fn = BigInt(leafIndex);
  let sn = BigInt(treeSize - 1);
  let r = hash;
  for (const p of path) {
    if (sn === 0n) fail(`inclusion path is too long: ${path.length} hashes, want ${want} ${where}`);
    if (fn & 1n || fn === sn) {
      r = await nodeHash(p, r);
      while (!(fn & 1n) && fn !== 0n) {
        fn >>= 1n;
        sn >>= 1n;
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  if (sn !== 0n) fail(`inclusion path is too short: ${path.length} hashes, want ${want} ${where}`);
  return r;
}

// --- check 6: the witness quorum -------------------------------------------------------------

/** C2SP tlog-cosignature/v1 witness keys, separated by spaces, commas or line breaks, each given
 * once; fails naming the key that does not parse. */
async function parseWitnessKeys(text) {
  const witnesses = [];
  for (const item of text.split(KEY_SEPARATORS).filter(Boolean)) {
    let witness;
    try {
      witness = await parseKey(item, ALG_COSIGNATURE_V1, "key");
    } catch (err) {
      if (err instanceof CheckFailed) fail(`witness key ${quote(item)}: ${err.message}`);
      throw err;
    }
    if (witnesses.some((w) => w.idHex === witness.idHex)) {
      fail(`the witness key ${witness.name}+${witness.idHex} is given twice`);
    }
    witnesses.push(witness);
  }
  return witnesses;
}

/** The witnesses and how many of them must cosign (default: all), or null when neither is given:
 * then there is no witness check, as `rxledger verify` without --witness. */
async function parseWitnesses(keysText, quorumText) {
  const quorumGiven = quorumText.trim();
  const witnesses = await parseWitnessKeys(keysText);
  if (!witnesses.length && !quorumGiven) return null;
  if (!witnesses.length) {
    fail(`a witness quorum of ${quote(quorumGiven)} is given but no witness keys: give their keys, or clear the quorum`);
  }
  if (!quorumGiven) return { witnesses, quorum: witnesses.length };
  const quorum = Number(quorumGiven);
  if (!/^[0-9]+$/.test(quorumGiven) || quorum > witnesses.length) {
    fail(`witness quorum ${quote(quorumGiven)}: want a whole number from 0 to ${witnesses.length} (the witness keys given)`);
  }
  return { witnesses, quorum };
}

/** cosignature/v1 signs "cosignature/v1\ntime <timestamp>\n" followed by the checkpoint text. */
const cosignedMessage = (text, timestamp) => utf8(`cosignature/v1\ntime ${timestamp}\n${text}`);

/** A UNIX time as a UTC ISO 8601 time, to the second. */
function utcTime(seconds) {
  const ms = Number(seconds) * 1000;
  if (ms > MAX_DATE_MS) return `UNIX time ${seconds}`;
  return new Date(ms).toISOString().replace(/\.000Z$/, "Z");
}

/** The valid cosignatures by `witnesses` on an opened checkpoint, as witness → UNIX time (a
 * BigInt). Lines by other keys are ignored; a witness's line that is not 76 bytes or does not
 * verify, or a witness's second line, fails (each line is verified at most once). */
async function cosignatures({ text, signatures }, witnesses) {
  const found = new Map();
  for (const s of signatures) {
    const witness = witnesses.find((w) => w.name === s.name && equalBytes(w.id, s.id));
    if (!witness) continue;
    const who = `${witness.name}+${witness.idHex}`;
    if (found.has(witness)) fail(`malformed cosignature: the checkpoint carries two cosignatures by ${who}`);
    const length = 4 + s.signature.length;
    if (length !== COSIGNATURE_BYTES) {
      fail(`malformed cosignature: the cosignature by ${who} is ${length} bytes, want ${COSIGNATURE_BYTES}`);
    }
    const timestamp = new DataView(s.signature.buffer, s.signature.byteOffset, 8).getBigUint64(0);
    const valid = timestamp <= MAX_TIMESTAMP && await crypto.subtle.verify(
      "Ed25519", witness.key, s.signature.subarray(8), cosignedMessage(text, timestamp),
    );
    if (!valid) {
      fail(`bad cosignature: the cosignature by ${who} does not verify: the checkpoint text and time are not what the witness signed`);
    }
    found.set(witness, timestamp);
  }
  return found;
}

/** "k of the n witnesses cosigned the checkpoint, q required", then who cosigned when, or who
 * is missing; fails below the quorum. */
async function checkQuorum(checkpoint, { witnesses, quorum }) {
  const found = await cosignatures(checkpoint, witnesses);
  const n = witnesses.length;
  const count = `${found.size} of the ${n} witness${n === 1 ? "" : "es"} cosigned the checkpoint, ${quorum} required`;
  const cosigned = witnesses.filter((w) => found.has(w)).map((w) => `${w.name} at ${utcTime(found.get(w))}`);
  if (found.size < quorum) {
    const missing = witnesses.filter((w) => !found.has(w)).map((w) => w.name);
    fail(`${count} (missing: ${missing.join(", ")})${cosigned.length ? `; cosigned: ${cosigned.join(", ")}` : ""}`);
  }
  return cosigned.length ? `${count}: ${cosigned.join(", ")}` : count;
}

// --- one bundle -------------------------------------------------------------------------------

/** The event header in a leaf (RFC 8785 JSON), or why it is not one; for the timeline only:
 * the log proves leaf bytes, whatever they hold. */
function readHeader(leaf) {
  try {
    const header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(leaf));
    if (header && typeof header.subject === "string" && Number.isSafeInteger(header.version)) {
      return { header };
    }
    return { headerError: "the leaf is JSON but not an event header (no subject and version)" };
  } catch (err) {
    return { headerError: `the leaf is not an event header (${err.message})` };
  }
}

/** The checks of a run: CHECKS, and the witness quorum when witnesses are given. */
function checksFor(witnessResult) {
  if (!witnessResult) return CHECKS;
  if (witnessResult.error) return [...CHECKS, QUORUM_CHECK];
  const { witnesses, quorum } = witnessResult;
  const title = `Witness quorum: at least ${quorum} of the ${witnesses.length} witness${witnesses.length === 1 ? "" : "es"} cosigned the checkpoint`;
  return [...CHECKS, { ...QUORUM_CHECK, title }];
}

/** Runs the checks on one bundle in order, calling `show(report)` as each settles;
 * `witnessResult` is null when no witness keys are given (five checks, no quorum). */
async function verifyBundle(entry, keyResult, witnessResult, show) {
  const checks = checksFor(witnessResult);
  const report = {
    label: entry.label,
    checks,
    states: checks.map(() => "pending"),
    details: checks.map(() => ""),
    failedAt: -1,
    done: false,
  };
  show(report);
  const steps = [
    () => {
      if (entry.error) fail(entry.error);
      const bundle = parseBundle(entry.value);
      Object.assign(report, { bundle }, readHeader(bundle.leaf));
      const path = `${bundle.path.length} hash${bundle.path.length === 1 ? "" : "es"}`;
      return `leaf of ${bundle.leaf.length} bytes at index ${bundle.leafIndex}, tree size ${bundle.treeSize}, inclusion path of ${path}`;
    },
    () => {
      if (keyResult.error) fail(keyResult.error);
      const { keys } = keyResult;
      if (keys.length === 1 && keys[0].last === null && keys[0].first === 0) {
        return `${keys[0].label}, an Ed25519 key`;
      }
      return `${keys.length} Ed25519 keys: ${keys.map((k) => `${k.label} (sizes ${k.sizes})`).join(", ")}`;
    },
    async () => {
      report.checkpoint = await openCheckpoint(report.bundle.checkpoint, keyResult.keys);
      const { origin, others, signers } = report.checkpoint;
      const ignored = others ? `; ${others} signature${others === 1 ? "" : "s"} by other keys ignored` : "";
      return `signed by ${signers.map((k) => k.label).join(", ")}, origin ${origin}${ignored}`;
    },
    () => {
      const { size } = report.checkpoint;
      if (size !== report.bundle.treeSize) {
        fail(`size mismatch: bundle treeSize ${report.bundle.treeSize}, checkpoint size ${size}`);
      }
      return `both are ${size}`;
    },
    async () => {
      const { leaf, leafIndex, treeSize, path } = report.bundle;
      const root = await rootFromInclusionPath(leafIndex, treeSize, await leafHash(leaf), path);
      const want = report.checkpoint.rootHash;
      if (!equalBytes(root, want)) {
        fail(`root mismatch: the root rebuilt from the leaf and inclusion path is ${b64(root)}, the checkpoint's root is ${b64(want)}`);
      }
      return `root ${b64(root)}`;
    },
  ];
  if (witnessResult) {
    steps.push(() => {
      if (witnessResult.error) fail(witnessResult.error);
      return checkQuorum(report.checkpoint, witnessResult);
    });
  }
  for (let i = 0; i < steps.length; i++) {
    try {
      report.details[i] = await steps[i]();
      report.states[i] = "passed";
    } catch (err) {
      report.states[i] = "failed";
      report.details[i] = err instanceof CheckFailed ? err.message : `unexpected error: ${err}`;
      report.failedAt = i;
      report.states.fill("skipped", i + 1);
      break;
    }
    show(report);
  }
  if (report.bundle) report.leafHash = b64(await leafHash(report.bundle.leaf));
  report.verified = report.failedAt < 0;
  report.done = true;
  show(report);
  return report;
}

// --- the hash chain ---------------------------------------------------------------------------

/** Per prescription, by version: version 1 has no prev, and every later version's prev is the
 * leaf hash of the version before it. Versions missing in between are gaps. */
function checkChain(reports) {
  const events = reports.filter((r) => r.header);
  const subjects = new Map();
  for (const r of events) {
    if (!subjects.has(r.header.subject)) subjects.set(r.header.subject, []);
    subjects.get(r.header.subject).push(r);
  }
  const gaps = [];
  const breaks = [];
  const rows = new Map();
  if (subjects.size > 1) {
    const listed = [...subjects].map(([s, rs]) => `${s} (version ${rs.map((r) => r.header.version).sort((a, b) => a - b).join(", ")})`);
    breaks.push(`the bundles are of ${subjects.size} prescriptions, not one: ${listed.join("; ")}`);
  }
  for (const [subject, group] of subjects) {
    group.sort((a, b) => a.header.version - b.header.version);
    const other = subjects.size > 1 ? ` of ${subject}` : "";
    let before = null;
    for (const r of group) {
      const { version, prev } = r.header;
      const at = `version ${version}${other}`;
      if (before && before.leafHash === r.leafHash) {
        rows.set(r, { state: "passed", text: "same event as above" });
        continue;
      }
      if (before && before.header.version === version) {
        breaks.push(`two different leaves claim ${at}`);
        rows.set(r, { state: "failed", text: `break: another leaf for version ${version}` });
      } else if (!before && version === 1) {
        const ok = prev === null || prev === undefined;
        if (!ok) breaks.push(`${at} has prev ${prev}; a first version has none`);
        rows.set(r, ok ? { state: "passed", text: "first version" } : { state: "failed", text: "break: a first version with a prev" });
      } else if (!before && group.length === 1) {
        rows.set(r, { state: "skipped", text: `not checked: version ${version - 1} not given` });
      } else if (!before) {
        const missing = version === 2 ? "version 1" : `versions 1 to ${version - 1}`;
        gaps.push(`${at} is the first given: ${missing}${other} missing`);
        rows.set(r, { state: "failed", text: `gap: ${missing} not given` });
      } else if (version > before.header.version + 1) {
        const missing = version - before.header.version === 2
          ? `version ${version - 1}` : `versions ${before.header.version + 1} to ${version - 1}`;
        gaps.push(`${missing}${other} missing between version ${before.header.version} and ${version}`);
        rows.set(r, { state: "failed", text: `gap: ${missing} not given` });
      } else if (prev === before.leafHash) {
        rows.set(r, { state: "passed", text: `links to version ${before.header.version}` });
      } else {
        breaks.push(`${at}'s prev ${prev ?? "null"} is not the leaf hash of version ${before.header.version}, ${before.leafHash}`);
        rows.set(r, { state: "failed", text: `break: prev is not version ${before.header.version}\u2019s leaf hash` });
      }
      before = r;
    }
  }
  let verdict = "complete";
  if (breaks.length) verdict = "broken";
  else if (gaps.length) verdict = "incomplete";
  else if (events.length < 2) verdict = "single";
  return { verdict, gaps, breaks, rows, subjects };
}

// --- the page ---------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function element(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

const mark = (state) => element("span", { class: "mark", "aria-hidden": "true", text: MARK[state] });

const files = []; // {name, text}: chosen or dropped bundle files, verified with the pasted text

function describeFailure(report) {
  return `check ${report.failedAt + 1} (${report.checks[report.failedAt].short}): ${report.details[report.failedAt]}`;
}

function eventName(report) {
  return report.header ? ` \u2014 version ${report.header.version} ${report.header.type ?? ""}`.trimEnd() : "";
}

function renderReport(report, index) {
  const id = `bundle-${index + 1}`;
  let node = $(id);
  const { done, checks: list } = report;
  if (!node) {
    node = element("details", { class: "bundle", id });
    $("bundle-reports").append(node);
  }
  const state = !done ? "pending" : report.verified ? "passed" : "failed";
  node.dataset.verdict = done ? (report.verified ? "verified" : "failed") : "pending";
  node.open = done && !report.verified;
  const verdict = !done ? "checking\u2026"
    : report.verified ? `verified: all ${list.length} checks passed`
      : `failed at check ${report.failedAt + 1} of ${list.length} (${list[report.failedAt].short})`;
  const summary = element(
    "summary", {}, mark(state), " ",
    element("span", { class: "label", text: `${report.label}${eventName(report)}` }), ": ",
    element("strong", { text: verdict }),
  );
  const checks = element("ol", { class: "checks" });
  report.states.forEach((s, i) => {
    const detail = report.details[i] ? `: ${report.details[i]}` : "";
    checks.append(element(
      "li", { "data-state": s, "data-check": list[i].short }, mark(s), " ",
      element("span", { class: "check", text: list[i].title }), " \u2014 ",
      element("strong", { text: WORD[s] }), detail,
    ));
  });
  node.replaceChildren(summary, checks);
}

/** Whether the chain verdict lets the bundles stand as one verified history. */
const chainGood = (chain) => chain.verdict === "complete" || chain.verdict === "single";

function renderTimeline(reports, chain) {
  const rows = reports.filter((r) => r.header);
  $("timeline-section").hidden = rows.length === 0;
  if (!rows.length) return;
  const several = chain.subjects.size > 1;
  rows.sort((a, b) => (a.header.subject === b.header.subject
    ? a.header.version - b.header.version : (a.header.subject < b.header.subject ? -1 : 1)));
  const columns = [...(several ? ["Prescription"] : []), "Version", "Event", "Actor", "Time", "Leaf index", "Proof", "Chain"];
  const subject = several ? `${chain.subjects.size} prescriptions` : `prescription ${rows[0].header.subject}`;
  const table = $("timeline");
  const head = element("tr", {}, ...columns.map((c) => element("th", { scope: "col", text: c })));
  const body = element("tbody");
  for (const r of rows) {
    const link = chain.rows.get(r) ?? { state: "skipped", text: "not checked" };
    const proof = r.verified
      ? element("td", { "data-label": "Proof", "data-state": "passed" }, mark("passed"), " verified")
      : element("td", { "data-label": "Proof", "data-state": "failed" }, mark("failed"), " ",
        element("a", { href: `#${r.id}`, text: `failed at check ${r.failedAt + 1} (${r.checks[r.failedAt].short})` }));
    const cells = [
      ...(several ? [element("td", { "data-label": "Prescription", text: r.header.subject })] : []),
      element("td", { "data-label": "Version", text: String(r.header.version) }),
      element("td", { "data-label": "Event", text: String(r.header.type ?? "") }),
      element("td", { "data-label": "Actor", text: String(r.header.actor ?? "") }),
      element("td", { "data-label": "Time" }, element("time", { text: String(r.header.at ?? "") })),
      element("td", { "data-label": "Leaf index", text: String(r.bundle.leafIndex) }),
      proof,
      element("td", { "data-label": "Chain", "data-state": link.state }, mark(link.state), ` ${link.text}`),
    ];
    body.append(element("tr", { "data-version": String(r.header.version) }, ...cells));
  }
  const caption = element("caption", { text: `Events of ${subject}, by version` });
  table.replaceChildren(caption, element("thead", {}, head), body);
  const chainText = {
    complete: `Hash chain complete: versions ${rows[0].header.version} to ${rows[rows.length - 1].header.version}, each prev equal to the leaf hash of the version before.`,
    single: "Hash chain: a single event; give all of a prescription's bundles to check its chain.",
    incomplete: `Hash chain incomplete: ${chain.gaps.join("; ")}.`,
    broken: `Hash chain broken: ${[...chain.breaks, ...chain.gaps].join("; ")}.`,
  }[chain.verdict];
  $("chain").replaceChildren(mark(chainGood(chain) ? "passed" : "failed"), ` ${chainText}`);
  $("chain").dataset.chain = chain.verdict;
}

function renderSummary(reports, chain) {
  const failed = reports.filter((r) => !r.verified);
  const n = reports.length;
  const checks = reports[0].checks.length; // the same checks for every bundle of a run
  const passing = n === 1 ? `The bundle passes all ${checks} checks.`
    : `All ${n} bundles pass all ${checks} checks.`;
  const lines = [];
  if (failed.length) {
    lines.push(`Failed: ${failed.length} of ${n} bundle${n === 1 ? "" : "s"} did not verify.`);
    for (const r of failed.slice(0, 3)) lines.push(`${r.label}${eventName(r)}: ${describeFailure(r)}`);
    if (failed.length > 3) lines.push(`\u2026 and ${failed.length - 3} more (see below).`);
  } else if (chainGood(chain)) {
    lines.push(`Verified: ${passing.charAt(0).toLowerCase()}${passing.slice(1)}`);
  } else {
    lines.push(`Not verified: the hash chain is ${chain.verdict}.`, passing);
  }
  if (chain.verdict === "complete") lines.push("Hash chain complete.");
  else if (chain.verdict === "incomplete") lines.push(`Hash chain incomplete: ${chain.gaps.join("; ")}.`);
  else if (chain.verdict === "broken") lines.push(`Hash chain broken: ${chain.breaks.join("; ")}.`);
  const good = !failed.length && chainGood(chain);
  $("summary").dataset.verdict = good ? "verified" : "failed";
  $("summary").replaceChildren(...lines.map((text, i) => (i === 0
    ? element("p", {}, mark(good ? "passed" : "failed"), " ", element("strong", { text }))
    : element("p", { text }))));
}

function sayOnly(text, verdict) {
  $("summary").dataset.verdict = verdict;
  $("summary").replaceChildren(element("p", {}, element("strong", { text })));
}

/** Every bundle to verify, from the pasted text and the files: one entry per bundle, or one
 * entry carrying the parse error of a source that is not JSON. */
function collectEntries() {
  const sources = [];
  if ($("bundles").value.trim()) sources.push({ name: "pasted text", text: $("bundles").value });
  sources.push(...files);
  const entries = [];
  for (const { name, text } of sources) {
    let value;
    try {
      value = JSON.parse(text);
    } catch (err) {
      entries.push({ label: name, error: `${name} is not valid JSON: ${err.message}` });
      continue;
    }
    if (!Array.isArray(value)) {
      entries.push({ label: name, value });
    } else if (!value.length) {
      entries.push({ label: name, error: `${name} is an empty JSON array: no bundles` });
    } else {
      value.forEach((v, i) => entries.push({ label: value.length === 1 ? name : `${name}, bundle ${i + 1} of ${value.length}`, value: v }));
    }
  }
  return entries;
}

let runs = 0;
let busy = false;

async function verify() {
  if (busy) return; // one run at a time: a second Enter while verifying changes nothing
  busy = true;
  const results = $("results");
  const run = ++runs;
  results.setAttribute("aria-busy", "true");
  $("bundle-reports").replaceChildren();
  $("timeline-section").hidden = true;
  $("bundle-section").hidden = true;
  try {
    if (!window.isSecureContext || !crypto.subtle) {
      sayOnly("Cannot verify here: WebCrypto needs a secure context. Open this page over HTTPS (or on localhost).", "failed");
      return;
    }
    const entries = collectEntries();
    if (!entries.length) {
      sayOnly("Nothing to verify: paste a bundle, or choose or drop bundle files.", "failed");
      return;
    }
    sayOnly(`Verifying ${entries.length} bundle${entries.length === 1 ? "" : "s"}\u2026`, "pending");
    $("bundle-section").hidden = false;
    const keyResult = await parseVerifierKeys($("key").value).then(
      (keys) => ({ keys }),
      (err) => ({ error: err instanceof CheckFailed ? err.message : `unexpected error: ${err}` }),
    );
    const witnessResult = await parseWitnesses($("witnesses").value, $("quorum").value).catch(
      (err) => ({ error: err instanceof CheckFailed ? err.message : `unexpected error: ${err}` }),
    );
    const reports = [];
    for (const [i, entry] of entries.entries()) {
      const report = await verifyBundle(entry, keyResult, witnessResult, (r) => renderReport(r, i));
      report.id = `bundle-${i + 1}`;
      reports.push(report);
    }
    const chain = checkChain(reports);
    renderTimeline(reports, chain);
    renderSummary(reports, chain);
  } finally {
    busy = false;
    results.setAttribute("aria-busy", "false");
    results.dataset.run = String(run);
  }
}

// --- files: chosen, dropped ---------------------------------------------------------------------

function renderFiles() {
  $("file-list").replaceChildren(...files.map((f, i) => element(
    "li", {}, element("span", { class: "file-name", text: f.name }), " ",
    element("button", {
      type: "button", class: "remove", "data-index": String(i), "aria-label": `Remove ${f.name}`, text: "Remove",
    }),
  )));
}

/** The type byte of a text shaped like a key (VERIFIER_KEY_SHAPE), or -1 when its base64 does
 * not decode: 0x01 for a log's verifier key, 0x04 for a witness key. */
function keyType(item) {
  try {
    return atob(item.slice(item.indexOf("+", item.indexOf("+") + 1) + 1)).charCodeAt(0);
  } catch {
    return -1;
  }
}

/** What a file holds when it is keys: {key} for one log verifier key (any type byte but 0x04:
 * check 2 says what is wrong with it) or a key set (log keys, one a line, with their sizes),
 * {witnesses} for witness keys only, {mixed} for several keys that are not all witness keys
 * nor all log keys; null when it is not keys (a bundle file). */
function keysIn(text) {
  const lines = text.split("\n").map((line) => line.replace(COMMENT, "").trim()).filter(Boolean);
  const tokens = lines.flatMap((line) => line.split(KEY_SEPARATORS)).filter(Boolean);
  const items = tokens.filter((token) => !KEY_RANGE.test(token));
  if (!items.length || !items.every((item) => VERIFIER_KEY_SHAPE.test(item))) return null;
  const ranged = items.length !== tokens.length;
  if (!ranged && items.every((item) => keyType(item) === ALG_COSIGNATURE_V1)) return { witnesses: items };
  if (items.length === 1 && !ranged) return { key: items[0] };
  if (items.every((item) => keyType(item) === ALG_ED25519)) return { key: lines.join("\n") };
  return { mixed: items };
}

/** Adds witness keys to the witness field, one a line, leaving out those already in it. */
function addWitnessKeys(items) {
  const field = $("witnesses");
  const given = new Set(field.value.split(KEY_SEPARATORS));
  field.value = [field.value.trim(), ...items.filter((k) => !given.has(k))].filter(Boolean).join("\n");
}

async function addFiles(list) {
  const notes = [];
  for (const file of list) {
    if (file.size > MAX_FILE_BYTES) {
      notes.push(`${file.name} is larger than ${MAX_FILE_BYTES >> 20} MiB: not read`);
      continue;
    }
    let text;
    try {
      text = await file.text();
    } catch (err) {
      notes.push(`${file.name} could not be read (${err.message})`);
      continue;
    }
    const keys = keysIn(text);
    if (keys?.key) {
      $("key").value = keys.key;
      notes.push(`${file.name}: verifier key filled in`);
      continue;
    }
    if (keys?.witnesses) {
      addWitnessKeys(keys.witnesses);
      const n = keys.witnesses.length;
      notes.push(`${file.name}: ${n} witness key${n === 1 ? "" : "s"} filled in`);
      continue;
    }
    if (keys?.mixed) {
      notes.push(`${file.name} holds ${keys.mixed.length} keys, not all witness keys (0x04): not read; give the log's key and the witness keys in separate files`);
      continue;
    }
    files.push({ name: file.name, text });
  }
  const bundles = files.length;
  notes.push(`${bundles} file${bundles === 1 ? "" : "s"} to verify`);
  $("file-status").textContent = `${notes.join("; ")}.`;
  renderFiles();
}

function setUp() {
  const form = $("audit-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    verify();
  });
  // The key field holds a key set after a rotation, one key a line (Shift+Enter): Enter
  // alone submits, as in a one-line field.
  $("key").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  $("clear").addEventListener("click", () => {
    form.reset();
    files.length = 0;
    renderFiles();
    $("file-status").textContent = "";
    $("bundle-reports").replaceChildren();
    $("timeline-section").hidden = true;
    $("bundle-section").hidden = true;
    sayOnly("Nothing verified yet.", "");
    $("key").focus();
  });
  $("files").addEventListener("change", async (event) => {
    await addFiles(event.target.files);
    event.target.value = "";
  });
  $("file-list").addEventListener("click", (event) => {
    const button = event.target.closest("button.remove");
    if (!button) return;
    const [removed] = files.splice(Number(button.dataset.index), 1);
    renderFiles();
    $("file-status").textContent = `${removed.name} removed; ${files.length} file${files.length === 1 ? "" : "s"} to verify.`;
    $("files").focus();
  });
  // Files dropped anywhere on the page are read, never opened by the browser in its place.
  const zone = $("dropzone");
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) zone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    zone.classList.remove("dragging");
    if (event.dataTransfer?.files.length) addFiles(event.dataTransfer.files);
  });
}

setUp();
