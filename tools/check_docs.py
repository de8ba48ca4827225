"""Real-browser checks, headless Chromium driven by Playwright, with every host but 127.0.0.1 blocked.

docs : serves _docs/ on 127.0.0.1 and loads the SA-CPS page; fails unless MathJax typeset >= 10 equations
       (Eq. 14 among them), no raw `$$` is left in the visible text, and >= 1 figure image loaded.
       Screenshot: _docs/check-docs-sacps.png (Eq. 14, then the first figure).
lab  : starts JupyterLab (token, 127.0.0.1), opens nbs/03_style_pool.ipynb with the smoke profile's data (papermill
       parameters; the synthesizer gets 10 epochs), runs the cells above the explorer and the explorer cell, moves
       its slice slider and
       fails unless the synthetic image (right panel) changed.
       Screenshot: _docs/check-lab-explorer.png.

`python tools/check_docs.py [docs] [lab]` (both by default). The browser is the system Chromium
(`SAPL_CHROMIUM`, default /usr/bin/chromium): Playwright's own browser download is not used.
"""
import functools, http.server, io, os, secrets, shutil, signal, socket, subprocess, sys, threading, time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT/'_docs'
CHROMIUM = os.environ.get('SAPL_CHROMIUM', '/usr/bin/chromium')
LOCAL = {'127.0.0.1'}
LAB_SEAN_EPOCHS = 10


class CheckFailed(AssertionError): pass


def check(ok: bool, msg: str):
    if not ok: raise CheckFailed(msg)
    print(f"  ok: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@contextmanager
def serve(folder: Path):
    "Static HTTP server for `folder` on 127.0.0.1 (a thread); yields the base URL."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    h = functools.partial(Quiet, directory=str(folder))
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), h)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try: yield f'http://127.0.0.1:{srv.server_address[1]}/'
    finally: srv.shutdown(); srv.server_close()


@contextmanager
def browser():
    "(context, blocked) with Chromium offline: requests to other hosts are aborted and recorded in `blocked`."
    from playwright.sync_api import sync_playwright
    if not Path(CHROMIUM).exists(): raise SystemExit(f"{CHROMIUM} not found: apt-get install -y chromium (or set SAPL_CHROMIUM)")
    blocked = []
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=['--no-sandbox', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1'])
        ctx = b.new_context(viewport={'width': 1280, 'height': 900}, service_workers='block')

        def route(r):
            if urlparse(r.request.url).hostname in LOCAL: r.continue_()
            else: blocked.append(r.request.url); r.abort()
        ctx.route('**/*', route)
        try: yield ctx, blocked
        finally: b.close()


def stack_png(parts: list, path: Path):
    "Stack PNG screenshots (bytes) vertically into one file."
    from PIL import Image
    ims = [Image.open(io.BytesIO(p)).convert('RGB') for p in parts]
    out = Image.new('RGB', (max(i.width for i in ims), sum(i.height for i in ims) + 8*(len(ims) - 1)), 'white')
    y = 0
    for i in ims: out.paste(i, (0, y)); y += i.height + 8
    out.save(path)


MATH_STATE = """async () => {
  await window.MathJax.startup.promise;
  const items = Array.from(window.MathJax.startup.document.math);
  return {n: document.querySelectorAll('mjx-container').length,
          display: document.querySelectorAll('mjx-container[display="true"]').length,
          errors: document.querySelectorAll('mjx-merror').length,
          eq14: items.filter(m => /\\\\tag\\{14\\}/.test(m.math)).map(m => m.math)};
}"""


def check_docs(page_name: str = '04_sacps') -> Path:
    print(f"docs: {page_name} page in headless Chromium, network blocked", flush=True)
    if not (SITE/page_name/'index.html').exists(): raise SystemExit(f"{SITE/page_name/'index.html'} missing: run `make docs` first")
    with serve(SITE) as base, browser() as (ctx, blocked):
        page = ctx.new_page()
        page.goto(base + f'{page_name}/', wait_until='load')
        page.wait_for_function('window.MathJax && window.MathJax.startup && window.MathJax.startup.promise', timeout=30_000)
        st = page.evaluate(MATH_STATE)
        check(st['n'] >= 10, f"MathJax typeset {st['n']} equations ({st['display']} display) on the {page_name} page (>= 10)")
        check(st['errors'] == 0, f"{st['errors']} TeX errors")
        check(len(st['eq14']) == 1, "Eq. 14 (\\tag{14}) typeset")
        raw = page.evaluate("""() => { const n = t => t.split('$$').length - 1;  // code may print $$ legitimately
            return n(document.body.innerText) - Array.from(document.querySelectorAll('pre')).reduce((a, p) => a + n(p.innerText), 0); }""")
        check(raw == 0, f"no raw $$ in the visible text outside code ({raw} found)")
        wide = page.evaluate("""() => Array.from(document.querySelectorAll('article pre'))
                                .filter(p => p.scrollWidth > p.clientWidth + 2).length""")
        check(wide == 0, f"code wraps: {wide} code/output blocks wider than the page")
        imgs = page.evaluate("""() => Array.from(document.querySelectorAll('article img'))
                               .map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight}))""")
        n_ok = sum(i['ok'] for i in imgs)
        check(n_ok >= 1, f"{n_ok} of {len(imgs)} figure images loaded")
        eq14 = page.evaluate_handle("""() => Array.from(window.MathJax.startup.document.math)
                                       .find(m => /\\\\tag\\{14\\}/.test(m.math)).typesetRoot""").as_element()
        shots = []
        for el in (eq14, page.locator('article img').first.element_handle()):
            el.scroll_into_view_if_needed(); page.evaluate('window.scrollBy(0, -120)'); shots.append(page.screenshot())
        out = SITE/f'check-docs-{page_name.split("_")[-1]}.png'; stack_png(shots, out)
        print(f"  screenshot: {out}")
        if blocked: print(f"  blocked {len(blocked)} requests to other hosts, e.g. {blocked[0]}")
        return out


def lab_server(port: int, token: str, log: Path) -> subprocess.Popen:
    # A settings folder of the check's own: the news question ("notified about official Jupyter news?") is answered
    # (no), so its pop-up does not cover the explorer in the screenshot; the user's own settings are not touched.
    settings = ROOT/'build'/'lab-check-settings'
    (settings/'@jupyterlab'/'apputils-extension').mkdir(parents=True, exist_ok=True)
    (settings/'@jupyterlab'/'apputils-extension'/'notification.jupyterlab-settings').write_text('{"fetchNews": "false"}\n')
    env = dict(os.environ); env.pop('IN_TEST', None)
    env.pop('MPLBACKEND', None)  # the inline backend draws the explorer's figures
    cmd = [str(Path(sys.executable).parent/'jupyter'), 'lab', '--no-browser', '--ip=127.0.0.1', f'--port={port}',
           f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={ROOT}', '--LabApp.expose_app_in_browser=True',
           '--LabApp.news_url=', '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
           '--ServerApp.open_browser=False', '--LabApp.extension_manager=readonly', f'--LabApp.user_settings_dir={settings}'] + (['--allow-root'] if os.geteuid() == 0 else [])
    return subprocess.Popen(cmd, env=env, stdout=open(log, 'w'), stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise SystemExit(f"JupyterLab exited ({proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
        try: urlopen(url, timeout=5); return
        except Exception: time.sleep(1)
    raise SystemExit(f"JupyterLab did not answer on {url} within {timeout:.0f}s; log: {log}")


RUN_TO_EXPLORER = """async () => {
  const app = window.jupyterapp;
  const panel = app.shell.currentWidget;
  await panel.context.ready; await panel.sessionContext.ready;
  const cells = panel.content.widgets;
  const i = cells.findIndex(c => c.model.type === 'code' && /^explorer\\(/m.test(c.model.sharedModel.getSource()));
  if (i < 0) return {error: 'no cell calls explorer(...)'};
  panel.content.activeCellIndex = i;
  const above = await app.commands.execute('notebook:run-all-above');
  panel.content.activeCellIndex = i;
  const cell = await app.commands.execute('notebook:run-cell');
  const errors = cells.slice(0, i + 1).filter(c => c.model.type === 'code' &&
                   c.model.outputs.toJSON().some(o => o.output_type === 'error')).map(c => cells.indexOf(c));
  return {index: i, kernel: panel.sessionContext.session.kernel.name, above, cell, errors};
}"""


def check_lab(nb: str = 'nbs/03_style_pool.ipynb', timeout_s: float = 900) -> Path:
    print(f"lab: the explorer of {nb} in JupyterLab (headless Chromium, network blocked, smoke data)", flush=True)
    port, token = free_port(), secrets.token_hex(16)
    log = SITE/'check-lab-server.log'; SITE.mkdir(exist_ok=True)
    # A copy inside the repository (so relative data paths resolve as usual): JupyterLab's autosave must not write
    # outputs into nbs/.
    # The smoke profile's one SEAN epoch draws an almost uniform image whatever the input, so the synthesizer gets
    # LAB_SEAN_EPOCHS epochs here (papermill injects the parameters, as for any run; ~1 min on 2 cores).
    work = ROOT/'build'/'lab-check'; shutil.rmtree(work, ignore_errors=True); work.mkdir(parents=True)
    import papermill as pm
    copy = work/Path(nb).name
    pm.execute_notebook(str(ROOT/nb), str(copy), prepare_only=True, progress_bar=False, parameters=dict(
        profile='smoke', data_dir='data/phantom-smoke', epochs=LAB_SEAN_EPOCHS, out_dir=str(work/'runs'), report_dir=str(work)))
    nb = copy.relative_to(ROOT).as_posix()
    proc = lab_server(port, token, log)
    base = f'http://127.0.0.1:{port}'
    try:
        wait_http(f'{base}/api/status?token={token}', proc, log)
        with browser() as (ctx, blocked):
            page = ctx.new_page(); page.set_default_timeout(timeout_s*1000)
            page.goto(f'{base}/lab/tree/{nb}?token={token}', wait_until='domcontentloaded')
            page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                                   "window.jupyterapp.shell.currentWidget.content && "
                                   "window.jupyterapp.shell.currentWidget.content.widgets.length > 0", timeout=180_000)
            try: return explore(page, blocked)
            except Exception:
                page.screenshot(path=str(SITE/'check-lab-explorer-failed.png'))
                print(f"  failure screenshot: {SITE/'check-lab-explorer-failed.png'}"); raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(30)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL)


def explore(page, blocked) -> Path:
    "Run the notebook up to its explorer cell, move the slice slider, compare the figure before and after."
    t0 = time.time(); r = page.evaluate(RUN_TO_EXPLORER)
    check('error' not in r and r['above'] is not False and r['cell'] is not False and not r['errors'],
          f"cells 0-{r.get('index')} (the explorer) ran without an error on kernel {r.get('kernel')!r} "
          f"in {time.time() - t0:.0f}s ({r})")
    cell = page.locator('.jp-Notebook .jp-Cell').nth(r['index'])
    img = cell.locator('.jp-OutputArea-output img.widget-image').first
    img.wait_for(state='visible', timeout=120_000)
    before_src, before = img.get_attribute('src'), img.screenshot()
    slider = cell.locator('.widget-slider').filter(has_text='slice').first
    readout = slider.locator('.widget-readout')
    k0 = readout.inner_text().strip()
    slider.locator('.noUi-handle').first.focus(); page.keyboard.press('Home')  # from the most infected slice to the first
    page.wait_for_function("([el, k]) => el.innerText.trim() !== k", arg=[readout.element_handle(), k0], timeout=30_000)
    k1 = readout.inner_text().strip()
    check(k1 != k0, f"slice slider moved {k0} -> {k1}")
    page.wait_for_function("([cell, src]) => { const i = cell.querySelector('img.widget-image'); "
                           "return i && i.complete && i.naturalWidth > 0 && i.getAttribute('src') !== src; }",
                           arg=[cell.element_handle(), before_src], timeout=120_000)
    after = cell.locator('.jp-OutputArea-output img.widget-image').first.screenshot()
    left, right = panel_change(before, after)
    check(right > 0.01, f"synthetic image (right panel) changed: {right:.1%} of its pixels differ "
                        f"(slice panel: {left:.1%})")
    no = page.get_by_role('button', name='No', exact=True)  # JupyterLab's "notified about news?" prompt
    if no.count(): no.first.click()
    cell.locator('.jp-OutputArea').first.scroll_into_view_if_needed()
    out = SITE/'check-lab-explorer.png'; page.screenshot(path=str(out))
    print(f"  screenshot: {out}")
    if blocked: print(f"  blocked {len(blocked)} requests to other hosts, e.g. {blocked[0]}")
    return out


def panel_change(a: bytes, b: bytes) -> tuple:
    "Fraction of pixels that differ in the left and right thirds of two screenshots of the explorer's figure."
    import numpy as np
    from PIL import Image
    x, y = (np.asarray(Image.open(io.BytesIO(p)).convert('L'), dtype=np.int16) for p in (a, b))
    h, w = min(x.shape[0], y.shape[0]), min(x.shape[1], y.shape[1]); d = np.abs(x[:h, :w] - y[:h, :w]) > 8
    return float(d[:, :w//3].mean()), float(d[:, 2*w//3:].mean())


def main(argv=None):
    what = (sys.argv[1:] if argv is None else argv) or ['docs', 'lab']
    t0 = time.time(); shots = []
    try:
        for w in what:
            t = time.time(); shots.append({'docs': check_docs, 'lab': check_lab}[w]())
            print(f"{w}: passed in {time.time() - t:.0f}s", flush=True)
    except CheckFailed as e:
        print(f"FAILED: {e}", flush=True); sys.exit(1)
    print(f"browser checks passed in {time.time() - t0:.0f}s; screenshots: {', '.join(map(str, shots))}")


if __name__ == '__main__':
    main()
