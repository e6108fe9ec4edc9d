"""The report page's inline stylesheet and its one script (head tabs of the heat maps).

System fonts only: the page must render offline, so nothing is loaded from anywhere.
"""

CSS = """
:root { --ink: #1d2330; --muted: #667085; --line: #e4e7ec; --bg: #f7f8fa; --accent: #2f5fd0; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
main { max-width: 1400px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 0 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 16px 0 8px; }
h4 { font-size: 13px; margin: 0 0 6px; color: var(--muted); font-weight: 600; }
header, section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 18px 20px; margin-bottom: 18px; }
.meta, figcaption, .stats, .empty { color: var(--muted); font-size: 12.5px; }
.empty { font-style: italic; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
caption { text-align: left; font-weight: 600; padding: 2px 0 4px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
th { background: #f2f4f7; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.key { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 12px; }
td.path { color: var(--muted); font-size: 11.5px; word-break: break-all; }
.se { color: var(--muted); font-size: 11.5px; }
.scroll { overflow-x: auto; }
table.eval th { white-space: normal; vertical-align: bottom; }
table.eval th, table.eval td { padding: 5px 7px; }
table.eval td.accept { font-size: 12px; min-width: 150px; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
figure { margin: 0 0 18px; }
figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px;
  margin: 0 6px 0 0; vertical-align: -1px; border: 1px solid rgba(0,0,0,.15); }
.swatch.none { background: #fff; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12px; }
.legend { display: flex; align-items: center; gap: 10px; font-size: 12.5px; margin: 6px 0 14px;
  flex-wrap: wrap; }
.cbar { position: relative; width: 320px; height: 34px; }
.cbar .grad { height: 14px; border-radius: 3px; border: 1px solid rgba(0,0,0,.2); }
.cbar .ticks { position: relative; height: 18px; }
.cbar .tick { position: absolute; top: 2px; transform: translateX(-50%); font-size: 11px;
  color: var(--muted); }
.cbar-label { font-weight: 600; }
.note { color: var(--muted); }
.heatrun { margin-bottom: 22px; }
.tw { border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; margin: 10px 0;
  background: #fcfcfd; }
details summary { cursor: pointer; color: var(--muted); font-size: 12.5px; margin: 4px 0; }
.tabs { display: flex; gap: 4px; margin: 10px 0 6px; }
.tab { font: inherit; font-size: 12.5px; padding: 3px 12px; border: 1px solid var(--line);
  border-radius: 14px; background: #fff; color: var(--ink); cursor: pointer; }
.tab.on { background: var(--accent); border-color: var(--accent); color: #fff; }
.headname { font-size: 12px; font-weight: 600; margin: 8px 0 4px; }
pre.code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 12.5px; line-height: 1.6; white-space: pre-wrap; word-break: break-all;
  margin: 0; padding: 10px 12px; background: #fff; border: 1px solid var(--line);
  border-radius: 4px; }
pre.prompt { color: var(--muted); max-height: 240px; overflow: auto; }
.heat .t.w { border-radius: 2px; box-shadow: inset -1px 0 0 rgba(255,255,255,.7); }
.heat .t:not(.w) { color: #98a2b3; }
.heat .drop { text-decoration: line-through; text-decoration-color: rgba(0,0,0,.35); }
.heat .nl::before { content: "\\21B5"; opacity: .45; font-size: 10px; }
"""

SCRIPT = """
// Record how many figures decoded, so a headless check can read it from the DOM.
window.addEventListener('load', () => {
  const images = [...document.images];
  const loaded = images.filter(i => i.naturalWidth > 0).length;
  document.body.dataset.images = loaded + '/' + images.length;
  // index.html#head=3 (or #head=all) opens that tab in every heat map: a link to a view.
  const head = new URLSearchParams(location.hash.slice(1)).get('head');
  if (head) document.querySelectorAll(`.tab[data-head="${head}"]`).forEach(showHead);
});
function showHead(button) {
  const box = button.closest('.tw'), head = button.dataset.head;
  box.querySelectorAll('.tab').forEach(b => b.classList.toggle('on', b === button));
  box.querySelectorAll('.headview').forEach(v => {
    v.hidden = !(head === 'all' || v.dataset.head === head);
  });
}
"""
