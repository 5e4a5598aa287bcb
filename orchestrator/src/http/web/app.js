// The live web view of a session. Turns stream through the same OpenAI-compatible endpoint
// any client uses (POST /v1/chat/completions, stream: true); the dream rides in each chunk's
// `x_dream`. Past turns come from the stored session (/api/sessions/{id}). Text from the
// models is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const state = { session: null, roles: { muse: "", majordomo: "" }, busy: false };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// The bearer token, when the orchestrator asks for one (401): kept in this browser.
function authorization() {
  const t = localStorage.getItem("mm-token");
  return t ? { authorization: `Bearer ${t}` } : {};
}

function askForToken() {
  $("token-box").hidden = false;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authorization() } });
  if (r.status === 401) askForToken();
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || `${r.status} ${r.statusText}`);
  return body;
}

// Entropy (nats) as a colour: blue when the muse is sure, amber when it hesitates.
function entropyColour(h) {
  const t = Math.max(0, Math.min(1, h / 4));
  const hue = 215 - t * 175;
  return `hsl(${hue}, 70%, ${60 - t * 8}%)`;
}

const TOP_COLOURS = ["#6b4fbb", "#9a83d6", "#c2b4ea", "#ddd4f5", "#ece7fa"];
const printable = (t) => JSON.stringify(t).slice(1, -1);

// ---------------------------------------------------------------- sessions and roles

async function loadSessions() {
  const { sessions } = await api("/api/sessions");
  const list = $("sessions");
  list.replaceChildren();
  for (const s of sessions) {
    const li = el("li");
    li.dataset.id = s.id;
    if (s.id === state.session) li.classList.add("current");
    li.append(el("span", "sid", s.id), el("span", "meta", `${s.turn_count} turns · ${s.roles.muse}`));
    li.onclick = () => openSession(s.id);
    list.append(li);
  }
}

async function loadModels() {
  const models = await api("/api/models");
  for (const role of ["muse", "majordomo"]) {
    const select = $(`role-${role}`);
    select.replaceChildren(...models[role].map((m) => {
      const o = el("option", null, m);
      o.value = m;
      return o;
    }));
    // A model either role may take: the union, so a swap is always possible.
    for (const m of models[role === "muse" ? "majordomo" : "muse"]) {
      if (!models[role].includes(m)) {
        const o = el("option", null, `${m} (not served for this role)`);
        o.value = m;
        o.disabled = true;
        select.append(o);
      }
    }
  }
}

function showRoles(roles) {
  state.roles = roles;
  $("role-muse").value = roles.muse;
  $("role-majordomo").value = roles.majordomo;
  $("session-title").replaceChildren(
    "session ", el("b", null, state.session), ` · muse ${roles.muse} · majordomo ${roles.majordomo}`);
}

async function applyRoles() {
  const roles = { muse: $("role-muse").value, majordomo: $("role-majordomo").value };
  if (!state.session) {
    state.roles = roles;
    return;
  }
  try {
    const s = await api(`/api/sessions/${encodeURIComponent(state.session)}/roles`, {
      method: "PUT", headers: { "content-type": "application/json" }, body: JSON.stringify(roles),
    });
    showRoles(s.roles);
  } catch (e) {
    $("transcript").append(el("div", "error", `Roles not changed: ${e.message}`));
  }
}

function swapRoles() {
  const m = $("role-muse").value;
  $("role-muse").value = $("role-majordomo").value;
  $("role-majordomo").value = m;
}

async function openSession(id) {
  const s = await api(`/api/sessions/${encodeURIComponent(id)}`);
  state.session = s.id;
  history.replaceState(null, "", `#session=${encodeURIComponent(s.id)}`);
  showRoles(s.roles);
  const t = $("transcript");
  t.replaceChildren();
  for (const turn of s.turns) t.append(storedTurn(turn));
  t.scrollTop = t.scrollHeight;
  await loadSessions();
}

async function newSession() {
  const s = await api("/api/sessions", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ muse: $("role-muse").value, majordomo: $("role-majordomo").value }),
  });
  await openSession(s.id);
  return s.id;
}

// ---------------------------------------------------------------- drawing a turn

function critiqueView(c) {
  const box = el("div", "critique");
  const head = el("div");
  const verdict = c.verdict || "none";
  head.append(el("span", `badge ${verdict}`, verdict));
  if (c.nll !== null && c.nll !== undefined) head.append(` fluency ${Number(c.nll).toFixed(2)} nats/token`);
  if (c.flags && c.flags.length) head.append(" · ", el("span", "flags", `flagged: ${c.flags.join(", ")}`));
  box.append(head);
  const body = c.critique || {};
  if (body.issues && body.issues.length) {
    const ul = el("ul");
    for (const i of body.issues) ul.append(el("li", null, `${i.kind}: ${i.detail}`));
    box.append(ul);
  }
  if (body.advice) box.append(el("div", null, `advice: noise ${body.advice.noise}, steps ${body.advice.steps}`));
  return box;
}

// A commit's text, the part that came from the dream marked.
function committed(text, rendered) {
  const span = el("span");
  if (rendered && text.startsWith(rendered)) {
    span.append(el("mark", "dreamt", rendered), text.slice(rendered.length));
  } else {
    span.append(text);
  }
  return span;
}

const COL = 38, BAR = 96, LABEL = 46;

// One burst of latent steps, drawn as it grows.
class BurstView {
  constructor(burst) {
    this.root = el("div", "burst");
    this.root.dataset.burst = burst;
    this.root.append(el("div", "burst-head", `burst ${burst + 1}`));
    this.svg = svg("svg", { height: BAR + LABEL + 8, width: COL });
    this.root.append(this.svg);
    this.foot = el("div", "burst-foot", "dreaming…");
    this.root.append(this.foot);
    this.steps = 0;
  }

  step(s) {
    const x = this.steps * COL;
    this.steps += 1;
    this.svg.setAttribute("width", this.steps * COL);
    const g = svg("g", { class: "step", transform: `translate(${x},0)` });
    g.dataset.step = s.step;
    g.append(svg("rect", { class: "bg", x: 1, y: 0, width: COL - 2, height: BAR + LABEL + 6, fill: "transparent" }));
    g.append(svg("rect", { x: 3, y: 0, width: COL - 6, height: 6, rx: 2, fill: entropyColour(s.entropy) }));
    let y = BAR + 8;
    (s.top || []).forEach((t, i) => {
      const h = Math.max(1, t.p * BAR);
      y -= h;
      g.append(svg("rect", { x: 6, y, width: COL - 12, height: h, fill: TOP_COLOURS[i] || "#eee" }));
    });
    const top = (s.top || [])[0];
    const label = svg("text", { class: "tok", x: COL / 2, y: BAR + 22, "text-anchor": "middle" },
      top ? printable(top.text).slice(0, 6) : "");
    g.append(label);
    g.append(svg("text", { x: COL / 2, y: BAR + 36, "text-anchor": "middle" }, s.entropy.toFixed(1)));
    const lines = [`step ${s.step + 1} · entropy ${s.entropy.toFixed(2)} nats · |e| ${s.norm.toFixed(2)}`];
    if (s.nearest) lines.push(`nearest token "${printable(s.nearest.text)}" (cosine ${s.nearest.cosine.toFixed(2)})`);
    for (const t of s.top || []) lines.push(`  "${printable(t.text)}" ${t.p.toFixed(2)}`);
    g.append(svg("title", {}, lines.join("\n")));
    this.svg.append(g);
  }

  end(b) {
    this.foot.textContent = `${b.steps} steps · stopped: ${b.stop.replace("_", " ")}`;
  }

  rendered(text) {
    if (text) this.foot.append(el("div", null, `→ "${text}"`));
  }
}

class AttemptView {
  constructor(number) {
    this.root = el("div", "attempt");
    this.root.dataset.attempt = number;
    const head = el("div", "attempt-head");
    head.append(el("span", "name", `attempt ${number}`));
    this.status = el("span", null, "dreaming…");
    head.append(this.status);
    this.dream = el("div", "dream");
    this.draft = el("div", "draft");
    this.root.append(head, this.dream, this.draft);
    this.bursts = new Map();
    this.lastBurst = null;
  }

  burst(n) {
    if (!this.bursts.has(n)) {
      const b = new BurstView(n);
      this.bursts.set(n, b);
      this.dream.append(b.root);
    }
    this.lastBurst = this.bursts.get(n);
    return this.lastBurst;
  }

  commit(c) {
    this.status.textContent = "committing…";
    if (c.rendered && this.lastBurst) this.lastBurst.rendered(c.rendered);
    this.draft.append(committed(c.text, c.rendered));
  }

  critique(c) {
    if (c.segment) return;
    this.status.textContent = "";
    this.root.append(critiqueView(c));
  }

  choose() {
    this.root.classList.add("chosen");
    this.status.replaceChildren(el("span", "badge chosen", "chosen"));
  }
}

// A turn that streams in now.
class LiveTurn {
  constructor(message) {
    this.root = el("div", "turn live");
    this.root.append(el("div", "user", message));
    this.attemptsBox = el("div", "attempts");
    this.reply = el("div", "reply");
    this.reply.append(el("span", "label", "reply"));
    this.text = el("span", "text");
    this.reply.append(this.text);
    this.root.append(this.attemptsBox, this.reply);
    this.attempts = new Map();
  }

  attempt(n) {
    if (!this.attempts.has(n)) {
      const a = new AttemptView(n);
      this.attempts.set(n, a);
      this.attemptsBox.append(a.root);
    }
    return this.attempts.get(n);
  }

  dream(d) {
    switch (d.type) {
      case "latent_step": this.attempt(d.attempt).burst(d.burst).step(d); break;
      case "burst": this.attempt(d.attempt).burst(d.burst).end(d); break;
      case "commit": this.attempt(d.attempt).commit(d); break;
      case "critique": this.attempt(d.attempt).critique(d); break;
      case "revision":
        this.attemptsBox.append(el("div", "revision",
          `↻ revising: ${d.reason}${d.plain ? "" : ` (noise ${d.noise.toFixed(2)}, ${d.steps} steps)`}`));
        break;
      case "failover":
        this.attemptsBox.append(el("div", "revision", `⚠ failover ${d.from} → ${d.to}: ${d.reason}`));
        break;
      default:
        if (d.chosen_attempt) this.attempt(d.chosen_attempt).choose();
    }
  }

  content(piece) {
    this.text.append(piece);
  }

  error(message) {
    this.root.append(el("div", "error", message));
  }
}

// A turn from the store: bursts as blocks (their steps are not stored), drafts, critiques.
function storedTurn(t) {
  const root = el("div", "turn");
  root.append(el("div", "user", t.user));
  const box = el("div", "attempts");
  for (const a of t.attempts) {
    const v = new AttemptView(a.number);
    v.status.textContent = a.plain ? "plain decoding" : `${a.bursts.length} bursts`;
    const bursts = el("div", "stored-bursts");
    a.bursts.forEach((b, i) => {
      const block = el("span", "stored-burst",
        `burst ${i + 1}: ${b.steps} steps, ${b.stop.replace("_", " ")}${b.rendered ? ` → "${b.rendered}"` : ""}`);
      block.style.background = entropyColour(b.mean_entropy);
      block.title = `mean entropy ${b.mean_entropy.toFixed(2)} nats, ${b.accepted} proposals accepted`;
      bursts.append(block);
    });
    v.dream.replaceWith(bursts);
    v.draft.textContent = a.draft;
    v.root.append(critiqueView(a));
    if (a.number === t.chosen_attempt) v.choose();
    box.append(v.root);
  }
  const reply = el("div", "reply");
  reply.append(el("span", "label", "reply"), el("span", "text", t.reply));
  root.append(box, reply);
  return root;
}

// ---------------------------------------------------------------- sending a turn

async function send(event) {
  event.preventDefault();
  const message = $("message").value.trim();
  if (!message || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  try {
    const id = state.session || (await newSession());
    $("message").value = "";
    const turn = new LiveTurn(message);
    $("transcript").append(turn.root);
    await stream(id, message, turn);
    await loadSessions();
  } catch (e) {
    $("transcript").append(el("div", "error", e.message));
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

async function stream(id, message, turn) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json", "x-session-id": id, ...authorization() },
    body: JSON.stringify({ messages: [{ role: "user", content: message }], stream: true }),
  });
  if (!r.ok) {
    if (r.status === 401) askForToken();
    const body = await r.json().catch(() => ({}));
    turn.error((body.error && body.error.message) || `${r.status} ${r.statusText}`);
    return;
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffered.indexOf("\n\n")) >= 0) {
      const frame = buffered.slice(0, cut);
      buffered = buffered.slice(cut + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          turn.error(chunk.error.message);
          return;
        }
        if (chunk.x_dream) turn.dream(chunk.x_dream);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) turn.content(delta.content);
        $("transcript").scrollTop = $("transcript").scrollHeight;
      }
    }
  }
}

// ---------------------------------------------------------------- the lab's frontier

function drawFrontier(results) {
  const W = 250, H = 190, P = 28;
  const settings = results.settings || [];
  const xs = settings.map((s) => s.distinct_2_across), ys = settings.map((s) => s.judge_nll);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => P + ((x - x0) / (x1 - x0 || 1)) * (W - P - 8);
  // Lower NLL is more fluent: drawn higher.
  const sy = (y) => 8 + ((y - y0) / (y1 - y0 || 1)) * (H - P - 8);
  const root = svg("svg", { width: W, height: H });
  root.append(svg("text", { x: W / 2, y: H - 4, "text-anchor": "middle" }, "diversity (distinct-2 across samples) →"));
  root.append(svg("text", { x: 10, y: H / 2, transform: `rotate(-90 10 ${H / 2})`, "text-anchor": "middle" }, "fluency (judge NLL, lower is up)"));
  const plain = settings.filter((s) => s.plain).sort((a, b) => a.distinct_2_across - b.distinct_2_across);
  if (plain.length > 1) {
    root.append(svg("polyline", {
      points: plain.map((s) => `${sx(s.distinct_2_across)},${sy(s.judge_nll)}`).join(" "),
      fill: "none", stroke: "#999", "stroke-dasharray": "3 2",
    }));
  }
  for (const s of settings) {
    const c = svg("circle", {
      cx: sx(s.distinct_2_across), cy: sy(s.judge_nll), r: s.name === "default" ? 4.5 : 3,
      fill: s.plain ? "#999" : "#6b4fbb",
    });
    c.append(svg("title", {}, `${s.name}: NLL ${s.judge_nll.toFixed(3)}, distinct-2 ${s.distinct_2_across.toFixed(3)}`));
    root.append(c);
    if (!s.plain || s.name.endsWith("0.7")) {
      root.append(svg("text", { x: sx(s.distinct_2_across) + 5, y: sy(s.judge_nll) + 3 }, s.name));
    }
  }
  $("frontier").replaceChildren(root);
}

// ---------------------------------------------------------------- start

$("ask").addEventListener("submit", send);
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("new-session").onclick = () => newSession().catch((e) => alert(e.message));
$("swap-roles").onclick = swapRoles;
$("token-save").onclick = () => {
  localStorage.setItem("mm-token", $("token").value.trim());
  location.reload();
};
$("apply-roles").onclick = applyRoles;
$("results-file").onchange = async (e) => {
  const file = e.target.files[0];
  if (file) drawFrontier(JSON.parse(await file.text()));
};

(async () => {
  await loadModels().catch(() => {});
  const id = new URLSearchParams(location.hash.slice(1)).get("session");
  if (id) await openSession(id).catch((e) => $("transcript").append(el("div", "error", e.message)));
  await loadSessions().catch(() => {});
})();
