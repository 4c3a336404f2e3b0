// Braid's browser interop client (see client.html). Plain ES2017 on top of Strophe.js 1.2.
//
// Parameters come from the URL query:
//   domain    the XMPP domain (also where upload.DOMAIN is looked for)
//   hostmeta  base URL host-meta is fetched from, e.g. https://localhost:5443
//   jid, password, peer   this account, and the account that answers (the test's slixmpp)
//   size      bytes of the file to upload
//   run       run id: the file's bytes and the message texts derive from it
//   report    where steps are POSTed (default: /report on this page's origin)
// Every step is shown in the page and POSTed as JSON {run, step, status, details}, where
// status is ok, info or error. The last one is the step "done".

"use strict";

const NS_UPLOAD = "urn:xmpp:http:upload:0";
const NS_OOB = "jabber:x:oob";
const NS_DISCO_INFO = "http://jabber.org/protocol/disco#info";
const NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items";
const NS_ROSTER = "jabber:iq:roster";
const WEBSOCKET_REL = "urn:xmpp:alt-connections:websocket";
const STEP_TIMEOUT = 15000;      // any one network step (ms)
const TRACE_LINES = 40;          // XMPP traffic kept for the final report
const TRACE_SHOWN = 16;          // ... and the last of it shown in the page

const query = new URLSearchParams(window.location.search);
const params = {
  domain: query.get("domain") || "localhost",
  hostmeta: (query.get("hostmeta") || "").replace(/\/$/, ""),
  jid: query.get("jid") || "",
  password: query.get("password") || "",
  peer: query.get("peer") || "",
  size: parseInt(query.get("size") || "4096", 10),
  run: query.get("run") || "run",
  report: query.get("report") || "/report",
};

const trace = [];
let failed = false;
let reports = Promise.resolve();

// -- reporting ---------------------------------------------------------------------------

function show(step, status, details) {
  const row = document.createElement("tr");
  row.className = status;
  row.dataset.step = step;
  const mark = status === "ok" ? "✔" : status === "error" ? "✘" : "•";
  // The trace has its own box below the table.
  const shown = details && typeof details === "object" && "trace" in details ? { ...details, trace: `${details.trace.length} lines` } : details;
  for (const [cls, text] of [["mark", mark], ["step", step], ["details", shown === undefined ? "" : JSON.stringify(shown)]]) {
    const cell = document.createElement("td");
    cell.className = cls;
    cell.textContent = text;
    row.appendChild(cell);
  }
  document.getElementById("steps").appendChild(row);
}

// Reports one step: in the page at once, and to the test in order (each POST waits for the
// previous one, so the test sees the steps as they happened).
function report(step, status, details) {
  if (status === "error") failed = true;
  show(step, status, details);
  const body = JSON.stringify({ run: params.run, step, status, details: details === undefined ? null : details, time: Date.now() });
  reports = reports.then(() => fetch(params.report, {
    method: "POST", headers: { "Content-Type": "application/json" }, body, keepalive: true,
  }).catch((error) => console.error("report failed", step, error)));
  return reports;
}

function record(direction, text) {
  trace.push(direction + " " + (text.length > 600 ? text.slice(0, 600) + "…" : text));
  if (trace.length > TRACE_LINES) trace.shift();
  document.getElementById("trace").textContent = trace.slice(-TRACE_SHOWN).join("\n");
}

window.addEventListener("error", (event) => {
  report("page-error", "error", { message: String(event.message), where: `${event.filename}:${event.lineno}` });
});
window.addEventListener("unhandledrejection", (event) => {
  report("page-error", "error", { message: String(event.reason && event.reason.stack || event.reason) });
});

// -- small helpers -------------------------------------------------------------------------

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

function bare(jid) { return Strophe.getBareJidFromJid(jid || "").toLowerCase(); }

function serialize(element) { return element ? Strophe.serialize(element) : String(element); }

// The file's bytes: xorshift32 seeded with the FNV-1a hash of the run id's UTF-8, one byte
// (the low 8 bits) per step. test_browser.py computes the same bytes.
function fileBytes(run, size) {
  let seed = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(run)) {
    seed ^= byte;
    seed = Math.imul(seed, 0x01000193) >>> 0;
  }
  let x = seed || 1;
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    bytes[i] = x & 0xff;
  }
  return bytes;
}

async function sha256Hex(buffer) {
  const digest = await crypto.subtle.digest("SHA-256", buffer);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

// -- XEP-0156 ------------------------------------------------------------------------------

async function fetchText(url) {
  const response = await withTimeout(fetch(url, { cache: "no-store" }), STEP_TIMEOUT, `GET ${url}`);
  const text = await response.text();
  if (!response.ok) throw new Error(`GET ${url}: HTTP ${response.status} ${text.slice(0, 200)}`);
  return { text, type: response.headers.get("Content-Type") };
}

async function discoverWebSocket() {
  const jsonURL = `${params.hostmeta}/.well-known/host-meta.json`;
  const json = await fetchText(jsonURL);
  let document;
  try { document = JSON.parse(json.text); } catch (error) { throw new Error(`${jsonURL} is not JSON: ${error.message}: ${json.text.slice(0, 200)}`); }
  const fromJSON = (document.links || []).filter((link) => link.rel === WEBSOCKET_REL).map((link) => link.href);
  await report("host-meta.json", fromJSON.length ? "ok" : "error", { url: jsonURL, type: json.type, websocket: fromJSON });

  const xrdURL = `${params.hostmeta}/.well-known/host-meta`;
  const xrd = await fetchText(xrdURL);
  const parsed = new DOMParser().parseFromString(xrd.text, "application/xml");
  if (parsed.getElementsByTagName("parsererror").length) throw new Error(`${xrdURL} is not XML: ${xrd.text.slice(0, 200)}`);
  const fromXRD = Array.from(parsed.getElementsByTagNameNS("http://docs.oasis-open.org/ns/xri/xrd-1.0", "Link"))
    .filter((link) => link.getAttribute("rel") === WEBSOCKET_REL).map((link) => link.getAttribute("href"));
  const agree = fromXRD.length > 0 && fromXRD.join(" ") === fromJSON.join(" ");
  await report("host-meta", agree ? "ok" : "error", { url: xrdURL, type: xrd.type, websocket: fromXRD, same_as_json: agree });

  const url = fromJSON.find((href) => /^wss:\/\//.test(href));
  if (!url) throw new Error(`no wss:// link with rel ${WEBSOCKET_REL} in host-meta.json: ${fromJSON}`);
  return url;
}

// -- XMPP ------------------------------------------------------------------------------------

function connect(url) {
  const connection = new Strophe.Connection(url, { protocol: "wss" });
  const sasl = { offered: [], used: null, success: false };
  connection.rawOutput = (text) => {
    record("→", text);
    const auth = /<auth\b[^>]*\bmechanism=["']([^"']+)["']/.exec(text);
    if (auth) sasl.used = auth[1];
  };
  connection.rawInput = (text) => {
    record("←", text);
    const offered = Array.from(text.matchAll(/<mechanism>([^<]+)<\/mechanism>/g), (m) => m[1]);
    if (offered.length) sasl.offered = offered;
    if (/<success\b/.test(text)) sasl.success = true;
  };
  const names = Object.fromEntries(Object.entries(Strophe.Status).map(([name, value]) => [value, name]));
  const statuses = [];
  const connected = new Promise((resolve, reject) => {
    connection.connect(params.jid, params.password, (status, condition) => {
      statuses.push(names[status] + (condition ? `(${condition})` : ""));
      if (status === Strophe.Status.CONNECTED) resolve();
      else if ([Strophe.Status.CONNFAIL, Strophe.Status.AUTHFAIL, Strophe.Status.ERROR,
                Strophe.Status.CONNTIMEOUT, Strophe.Status.DISCONNECTED].includes(status)) {
        reject(new Error(`Strophe status ${names[status]}${condition ? " (" + condition + ")" : ""}; statuses ${statuses.join(", ")}`));
      }
    });
  });
  return { connection, sasl, statuses, connected };
}

function sendIQ(connection, iq, what) {
  return withTimeout(new Promise((resolve, reject) => {
    connection.sendIQ(iq, resolve, (error) => reject(new Error(`${what}: ${error ? serialize(error) : "timed out in Strophe"}`)), STEP_TIMEOUT);
  }), STEP_TIMEOUT + 1000, what);
}

// Messages received, and waits for one that matches.
class Inbox {
  constructor(connection) {
    this.messages = [];
    this.waiters = [];
    connection.addHandler((stanza) => { this.add(stanza); return true; }, null, "message");
  }
  add(stanza) {
    this.messages.push(stanza);
    this.waiters = this.waiters.filter((waiter) => !waiter(stanza));
  }
  wait(match, what, ms = STEP_TIMEOUT) {
    const found = this.messages.find(match);
    if (found) return Promise.resolve(found);
    return withTimeout(new Promise((resolve) => {
      this.waiters.push((stanza) => { if (match(stanza)) { resolve(stanza); return true; } return false; });
    }), ms, what);
  }
}

function bodyOf(stanza) {
  const body = stanza.getElementsByTagName("body")[0];
  return body ? unescapeXML(Strophe.getText(body)) : null;
}

// Strophe's getText escapes XML; URLs in bodies come back with &amp; otherwise.
function unescapeXML(text) {
  return text.replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&quot;/g, "\"").replace(/&apos;/g, "'").replace(/&amp;/g, "&");
}

async function findUploadService(connection) {
  const items = await sendIQ(connection, $iq({ type: "get", to: params.domain }).c("query", { xmlns: NS_DISCO_ITEMS }), "disco#items");
  const listed = Array.from(items.getElementsByTagName("item"), (item) => item.getAttribute("jid"));
  const candidates = listed.length ? listed : [];
  const expected = `upload.${params.domain}`;
  if (!candidates.includes(expected)) candidates.push(expected);   // XEP-0363 allows asking directly
  for (const jid of candidates) {
    let info;
    try {
      info = await sendIQ(connection, $iq({ type: "get", to: jid }).c("query", { xmlns: NS_DISCO_INFO }), `disco#info ${jid}`);
    } catch (error) {
      continue;
    }
    const features = Array.from(info.getElementsByTagName("feature"), (feature) => feature.getAttribute("var"));
    if (!features.includes(NS_UPLOAD)) continue;
    let maxSize = null;
    for (const field of info.getElementsByTagName("field")) {
      if (field.getAttribute("var") === "max-file-size") {
        const value = field.getElementsByTagName("value")[0];
        if (value) maxSize = parseInt(Strophe.getText(value), 10);
      }
    }
    return { jid, listed, listed_in_items: listed.includes(jid), max_file_size: maxSize };
  }
  throw new Error(`no XEP-0363 service: disco#items of ${params.domain} listed ${JSON.stringify(listed)}, and ${expected} does not offer ${NS_UPLOAD}`);
}

async function requestSlot(connection, service, filename, size, type) {
  const result = await sendIQ(connection, $iq({ type: "get", to: service })
    .c("request", { xmlns: NS_UPLOAD, filename, size: String(size), "content-type": type }), "upload slot request");
  const put = result.getElementsByTagName("put")[0];
  const get = result.getElementsByTagName("get")[0];
  if (!put || !get) throw new Error(`slot without put/get: ${serialize(result)}`);
  const headers = {};
  for (const header of put.getElementsByTagName("header")) {
    const name = header.getAttribute("name");
    // XEP-0363 §4: only these may be copied into the PUT.
    if (/^(authorization|cookie|expires)$/i.test(name)) headers[name] = unescapeXML(Strophe.getText(header));
  }
  return { put: put.getAttribute("url"), get: get.getAttribute("url"), headers };
}

// -- the scenario ----------------------------------------------------------------------------

async function run() {
  document.getElementById("params").textContent =
    `run ${params.run} · ${params.jid} → ${params.peer} · host-meta ${params.hostmeta} · ${params.size} bytes`;
  await report("start", "info", { userAgent: navigator.userAgent, strophe: Strophe.VERSION, secure_context: window.isSecureContext });

  const url = await discoverWebSocket();

  const session = connect(url);
  const { connection, sasl } = session;
  const inbox = new Inbox(connection);
  try {
    await withTimeout(session.connected, STEP_TIMEOUT * 2, "WebSocket login");
  } catch (error) {
    await report("login", "error", { url, message: error.message, sasl });
    throw error;
  }
  const scram = /^SCRAM-SHA-(1|256|512)(-PLUS)?$/.test(sasl.used || "");
  await report("login", scram && sasl.success ? "ok" : "error", {
    url, jid: connection.jid, mechanism: sasl.used, offered: sasl.offered, success: sasl.success, statuses: session.statuses,
  });
  if (!scram) throw new Error(`logged in with ${sasl.used}, not SCRAM`);

  // Presence, then a roster get: its answer proves the presence was handled first.
  connection.send($pres().tree());
  const roster = await sendIQ(connection, $iq({ type: "get" }).c("query", { xmlns: NS_ROSTER }), "roster get");
  await report("presence", "ok", { roster_items: roster.getElementsByTagName("item").length });

  const hello = `hello from the browser, run ${params.run} ✓`;
  connection.send($msg({ to: params.peer, type: "chat", id: `hello-${params.run}` }).c("body").t(hello).tree());
  const reply = await inbox.wait((stanza) => bare(stanza.getAttribute("from")) === bare(params.peer) && bodyOf(stanza) === `reply to: ${hello}`,
    "the peer's reply");
  await report("chat", "ok", { sent: hello, reply: bodyOf(reply), from: reply.getAttribute("from") });

  const service = await findUploadService(connection);
  await report("upload-service", "ok", service);

  const filename = `braid-${params.run}.bin`;
  const type = "application/octet-stream";
  const bytes = fileBytes(params.run, params.size);
  const sha256 = await sha256Hex(bytes);
  const slot = await requestSlot(connection, service.jid, filename, bytes.length, type);
  await report("slot", "ok", { put: slot.put, get: slot.get, headers: Object.keys(slot.headers) });

  const put = await withTimeout(fetch(slot.put, {
    method: "PUT", body: new Blob([bytes], { type }), headers: { "Content-Type": type, ...slot.headers }, cache: "no-store",
  }), STEP_TIMEOUT, "PUT");
  const putText = await put.text();
  if (!put.ok) throw new Error(`PUT ${slot.put}: HTTP ${put.status} ${putText.slice(0, 200)}`);
  await report("put", "ok", { status: put.status, size: bytes.length, sha256 });

  // The browser reads the file back too (cross-origin: needs the service's CORS headers).
  const got = await withTimeout(fetch(slot.get, { cache: "no-store" }), STEP_TIMEOUT, "GET");
  const gotBytes = await got.arrayBuffer();
  const gotSha = await sha256Hex(gotBytes);
  if (!got.ok || gotSha !== sha256) {
    throw new Error(`GET ${slot.get}: HTTP ${got.status}, ${gotBytes.byteLength} bytes, sha256 ${gotSha} (uploaded ${sha256})`);
  }
  await report("get", "ok", { status: got.status, size: gotBytes.byteLength, type: got.headers.get("Content-Type") });

  // Shared as Conversations does: the URL as the body, and the same in XEP-0066 oob.
  connection.send($msg({ to: params.peer, type: "chat", id: `file-${params.run}` })
    .c("body").t(slot.get).up()
    .c("x", { xmlns: NS_OOB }).c("url").t(slot.get).tree());
  const verdict = await inbox.wait((stanza) => bare(stanza.getAttribute("from")) === bare(params.peer) && /^(downloaded|download failed)/.test(bodyOf(stanza) || ""),
    "the peer's word on the download");
  const expected = `downloaded ${bytes.length} bytes sha256 ${sha256}`;
  await report("share", bodyOf(verdict) === expected ? "ok" : "error", { url: slot.get, peer_says: bodyOf(verdict), expected });

  await new Promise((resolve) => {
    connection.addHandler(() => { resolve(); return false; }, null, "iq", "result", "last-ping");
    connection.send($iq({ type: "get", id: "last-ping", to: params.domain }).c("ping", { xmlns: "urn:xmpp:ping" }).tree());
    setTimeout(resolve, 3000);
  });
  connection.disconnect("done");
}

async function main() {
  try {
    await run();
  } catch (error) {
    await report("failure", "error", { message: error.message });
  }
  const status = failed ? "error" : "ok";
  const heading = document.getElementById("status");
  heading.className = status;
  heading.textContent = failed ? "FAILED" : "all steps passed";
  document.title = `Braid browser interop: ${failed ? "FAILED" : "passed"}`;
  await report("done", status, { trace: failed ? trace : trace.slice(-6) });
}

main();
