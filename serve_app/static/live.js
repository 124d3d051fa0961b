// Refreshes the server-rendered pages in place; every page is complete without it (docs/web.md).
// #page[data-refresh=s]: re-fetch this page's HTML every s seconds and swap it in (leaderboard, queue).
// #page[data-live=url]: poll the JSON API, update the progress fields and extend the learning curve (submission).
"use strict";

const POLL_MS = 3000;
// Keep in step with serve_app/pages.py (CHART_WIDTH, CHART_HEIGHT, CHART_MARGIN).
const CHART = {width: 720, height: 300, left: 52, right: 16, top: 12, bottom: 30};
const SVG_NS = "http://www.w3.org/2000/svg";
let livePoints = null;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function swapPage() {
  // The server's own escaped HTML, exactly what a reload would show.
  const response = await fetch(location.href, {headers: {Accept: "text/html"}, cache: "no-store"});
  if (!response.ok) return;
  const fresh = new DOMParser().parseFromString(await response.text(), "text/html").getElementById("page");
  const page = document.getElementById("page");
  if (fresh && page) page.replaceWith(document.adoptNode(fresh));
}

async function pollLive() {
  const page = document.getElementById("page");
  const response = await fetch(page.dataset.live, {headers: {Accept: "application/json"}, cache: "no-store"});
  if (!response.ok) return;
  const status = await response.json();
  if (status.status !== page.dataset.status) {  // a new status brings new sections: take the server's page
    livePoints = null;
    await swapPage();
    return;
  }
  const progress = status.progress || {};
  setField(page, "stage", status.stage);
  setField(page, "bytes_scored", formatBytes(progress.bytes_scored));
  setField(page, "running_bpb", formatNumber(progress.running_bpb, 4));
  setField(page, "tokens_per_second", formatNumber(progress.tokens_per_second, 0));
  setField(page, "node", progress.node_address || progress.node || "—");
  setField(page, "updated_at", formatTime(progress.updated_at));
  const bar = page.querySelector('[data-field="progress"]');
  if (bar && progress.bytes_scored != null) {
    if (progress.byte_budget) bar.max = progress.byte_budget;
    bar.value = progress.bytes_scored;
  }
  if (progress.bytes_scored > 0 && Number.isFinite(progress.running_bpb)) {
    livePoints ??= JSON.parse(page.querySelector("[data-points]").dataset.points);
    const last = livePoints[livePoints.length - 1];
    if (!last || last[0] !== progress.bytes_scored) livePoints.push([progress.bytes_scored, progress.running_bpb]);
    drawChart(document.getElementById("curve"), livePoints);
  }
}

function setField(page, name, text) {
  const element = page.querySelector(`[data-field="${name}"]`);
  if (element && text != null) element.textContent = text;
}

function formatNumber(value, digits) {
  if (value == null || !Number.isFinite(value)) return "—";
  return value.toLocaleString("en-US", {minimumFractionDigits: digits, maximumFractionDigits: digits});
}

function formatBytes(value) {
  if (value == null) return "—";
  for (const [unit, size] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) {
    if (value >= size) return `${Number((value / size).toPrecision(3))} ${unit}`;
  }
  return `${value} B`;
}

function formatTime(seconds) {
  return seconds == null ? "—" : new Date(seconds * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
}

// --- the chart: the same drawing as pages.line_chart ------------------------------------------------------------

function linearTicks(low, high) {
  if (high - low < 1e-9) [low, high] = [low - 0.5, high + 0.5];
  const raw = (high - low) / 5;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const start = Math.floor(low / step);
  const count = Math.ceil(high / step) - start + 1;
  return Array.from({length: count}, (_, i) => Number(((start + i) * step).toFixed(10)));
}

function logTicks(low, high) {
  const ticks = [];
  for (let k = Math.floor(Math.log10(low)); k <= Math.ceil(Math.log10(high)); k++) {
    for (const m of [1, 2, 5]) if (low <= m * 10 ** k && m * 10 ** k <= high) ticks.push(m * 10 ** k);
  }
  if (ticks.length > 8) return ticks.filter((tick) => Number.isInteger(Math.log10(tick)));
  return ticks.length ? ticks : [low, high];
}

function add(parent, tag, attributes, text) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (text != null) element.textContent = text;
  parent.appendChild(element);
  return element;
}

function drawChart(svg, points) {
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  let [xLo, xHi] = [Math.min(...xs), Math.max(...xs)];
  if (xLo === xHi) [xLo, xHi] = [xLo / 2, xHi * 2];
  const yTicks = linearTicks(Math.min(...ys), Math.max(...ys));
  const [yLo, yHi] = [yTicks[0], yTicks[yTicks.length - 1]];
  const plotW = CHART.width - CHART.left - CHART.right;
  const plotH = CHART.height - CHART.top - CHART.bottom;
  const xAt = (v) => CHART.left + (Math.log(v) - Math.log(xLo)) / (Math.log(xHi) - Math.log(xLo)) * plotW;
  const yAt = (v) => CHART.top + (yHi - v) / (yHi - yLo) * plotH;
  svg.replaceChildren();
  const axes = add(svg, "g", {class: "axes"});
  for (const tick of yTicks) {
    add(axes, "line", {x1: CHART.left, x2: CHART.width - CHART.right, y1: yAt(tick), y2: yAt(tick)});
    add(axes, "text", {class: "y-tick", x: CHART.left - 6, y: yAt(tick)}, String(tick));
  }
  for (const tick of logTicks(xLo, xHi)) {
    add(axes, "line", {x1: xAt(tick), x2: xAt(tick), y1: CHART.top, y2: CHART.height - CHART.bottom});
    add(axes, "text", {class: "x-tick", x: xAt(tick), y: CHART.height - CHART.bottom + 16}, formatBytes(tick));
  }
  const d = "M" + points.map((p) => `${xAt(p[0]).toFixed(1)},${yAt(p[1]).toFixed(1)}`).join(" L");
  add(svg, "path", {class: "series series-0", d});
  const last = points[points.length - 1];
  add(svg, "circle", {class: "series-end series-0", cx: xAt(last[0]).toFixed(1), cy: yAt(last[1]).toFixed(1), r: 3});
}

async function loop(ms, step) {
  for (;;) {
    await sleep(ms);
    const page = document.getElementById("page");
    if (!page || !(page.dataset.live || page.dataset.refresh)) return;  // a finished submission stops polling
    if (document.hidden) continue;
    try {
      await step();
    } catch (error) {
      console.debug("refresh failed, retrying", error);  // the server restarting is not the page's problem
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.getElementById("page");
  if (page?.dataset.live) loop(POLL_MS, pollLive);
  else if (page?.dataset.refresh) loop(Number(page.dataset.refresh) * 1000, swapPage);
});
