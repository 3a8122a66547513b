#!/usr/bin/env python
"""Build the documentation site offline: `python tools/build_docs.py` writes `_docs/`.

Quarto cannot be installed everywhere we build, so the site is rendered with smalldocs (pure Python) from the same
nbdev-processed notebooks that Quarto would render. The steps, all in a temporary staging folder (the repository is
only read, apart from the side effects of running its notebooks):

1. **Stage** pyproject.toml, settings.ini and the source files of `nbs/`, and run nbdev's set-up for `_proc/` as
   `nbdev-proc-nbs` does (`refresh_quarto_yml`, `nbdev_sidebar`, `proc_nbs` for the non-notebook files), minus its
   Quarto install and its rebuild of `_modidx.py` in the repository.
2. **Execute and process** each notebook, in parallel, one fresh process each: run it as `nbdev-test` does (in
   `nbs/`, same skipped `tst_flags`, `IN_TEST=1`) and keep its outputs, plots included; committed notebooks have no
   outputs (nbdev-clean strips them), so without this the pages would have code and API entries but no results or
   plots. Then apply nbdev's docs processors (`FilterDefaults`: front matter, `show_doc` entries, hidden and exported
   cells, symbol links...) with one change: the `show_doc` cells nbdev adds run in the shell that ran the notebook
   instead of a second, fresh run of its imports and exports (`exec_show_docs`), so each notebook runs once.
   Stream outputs are shown as Jupyter shows them (fastai's console progress bars collapse to the metrics table);
   links to repository files outside `nbs/` go to GitHub, and images from outside `nbs/` are copied into the site.
   `--no-exec` (or `--exec-re`) processes exactly as `nbdev-proc-nbs` does instead.
3. **Render** `_proc/` with `smalldocs render` (or with real Quarto: `--quarto`, as the GitHub Pages workflow does).
4. **Post-process** (smalldocs only): smalldocs names pages after their notebooks (`99_config.html`) and ignores
   nbdev's `output-file` front matter (`config.html`), which nbdev's symbol links and module docstrings point to.
   Each page is renamed to its `output-file` and every reference to it rewritten; absolute links into the site's own
   `site-url` (nbdev's symbol links) become relative, and the maths is pre-rendered as MathML (`latex2mathml`) instead
   of KaTeX from a CDN, so the site also works offline. Then links and anchors are checked on the final site (smalldocs'
   own check runs before the renaming): each broken one is reported as `[build_docs] broken link: PAGE: LINK (why)`.

Then `_docs/` (or `--out DIR`) is replaced by the new site. A notebook that fails stops the build (`--allow-errors`
renders it anyway, without outputs).

`--readme` also regenerates README.md from `nbs/index.ipynb` with pandoc (`pypandoc_binary`): markdown and code cells,
GitHub-flavoured markdown, no outputs, hidden/export-only cells dropped, links to pages made absolute. `--readme-only`
does just that, in a second and without executing anything.

This script depends on nbdev, execnb, smalldocs and pypandoc only, not on the package it documents.
"""
import argparse, html, json, os, posixpath, re, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE_EXTS = ('.ipynb', '.qmd', '.md')


def log(*a): print('[build_docs]', *a, file=sys.stderr, flush=True)


def nb_paths(nbs: Path) -> list[Path]:
    "The notebooks under `nbs` that nbdev makes pages of (no `_`/`.` prefixed file or folder), relative to `nbs`."
    return sorted(p.relative_to(nbs) for p in nbs.rglob('*.ipynb')
                  if not any(s.startswith(('_', '.')) for s in p.relative_to(nbs).parts))


# ---------------------------------------------------------------------------------------------------------------------
# 1. Stage, 2. execute and process
# ---------------------------------------------------------------------------------------------------------------------
def stage_project(root: Path, stage: Path, cfg) -> Path:
    "Copy the project files nbdev's processing reads into `stage`; returns the staged notebooks folder."
    shutil.copy2(cfg.config_file, stage / cfg.config_file.name)
    if (root / 'settings.ini').exists(): shutil.copy2(root / 'settings.ini', stage / 'settings.ini')
    rel = cfg.nbs_path.relative_to(cfg.config_path)
    ign = shutil.ignore_patterns('.ipynb_checkpoints', '__pycache__', '_proc', '_docs', '.*',
                                 *([] if cfg.custom_sidebar else ['sidebar.yml']))  # else nbdev generates it
    r = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard', '--', str(cfg.nbs_path)],
                       cwd=root, capture_output=True, text=True)
    if r.returncode:  # not a git checkout: every file but the usual clutter
        shutil.copytree(cfg.nbs_path, stage / rel, ignore=ign)
        return stage / rel
    for f in filter(None, r.stdout.split('\0')):  # the sources: tracked or not ignored (leaves out models/, outputs, ...)
        src, p = root / f, Path(f)
        if not src.is_file() or any(s.startswith('.') for s in p.parts): continue
        (stage / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, stage / p)
    (stage / rel).mkdir(parents=True, exist_ok=True)
    return stage / rel


def prepare_proc(stage: Path, stage_nbs: Path) -> Path:
    "nbdev's set-up for `_proc`, as `nbdev-proc-nbs` does it in `stage`, but for the notebooks; returns the `_proc` folder."
    os.chdir(stage)  # nbdev calls `get_config()` without a path, here and in its workers
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    refresh_quarto_yml()  # nbdev.yml from pyproject.toml, as nbdev-docs does on every build
    nbdev_sidebar.__wrapped__(path=stage_nbs)  # sidebar.yml, unless `custom_sidebar`
    return proc_nbs(stage_nbs, n_workers=0, force=True, file_re=r'^$')  # everything but the notebooks: configs, styles, files


def proc_one(src: Path, staged: Path, dst: Path, skip_flags: list[str], cell_timeout, run: bool) -> int:
    """Execute notebook `src` as `nbdev-test` does (in its own folder, `skip_flags` cells left out), save it with its
    outputs to `staged`, then process that copy into `dst` with nbdev's docs processors (`FilterDefaults`). With `run`,
    nbdev's `exec_show_docs` (which re-runs imports, exports and `show_doc` in a fresh namespace) is replaced by running
    just the `show_doc` cells nbdev adds in the shell that ran the notebook, so each notebook runs once."""
    from fastcore.nbio import read_nb, write_nb
    from fastcore.xtras import working_directory
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults, exec_show_docs
    from nbdev.test import nb_test_cells
    os.environ['IN_TEST'] = '1'  # as nbdev-test and nbdev's docs processing set it
    k = None
    if run:
        todo = {c.idx_ for c in nb_test_cells(src, skip_flags=skip_flags)}
        nb = NBProcessor(src, rm_directives=False, process=True).nb
        k = CaptureShell(src, profile=bool(get_config(src.parent).exec_profile))
        try:
            with working_directory(src.parent):
                k.run_all(nb, exc_stop=True, preproc=lambda c: c.idx_ not in todo, cell_timeout=cell_timeout)
        except BaseException:
            print(k.prettytb(fname=src) or 'execution failed', file=sys.stderr)
            return 1
        for c in nb.cells: collapse_cr(c)
        write_nb(nb, staged)

    class exec_added_show_docs(exec_show_docs):
        "Run the `show_doc` cells `add_show_docs` inserted, in the shell that ran the notebook"
        def begin(self):
            self.k = k
            k.run_cell('from nbdev.showdoc import show_doc')
        def __call__(self, cell):
            if not getattr(cell, 'has_sd', False): return
            self.k.cell(cell)
            if self.k.exc: raise Exception(f'Error in {src.name}, {cell.source}: {type(self.k.exc).__name__}: {self.k.exc}') from self.k.exc

    procs = FilterDefaults().procs()
    if run: procs = procs.map(lambda p: exec_added_show_docs if p is exec_show_docs else p)
    nb = read_nb(staged)
    try:
        with working_directory(src.parent): NBProcessor(nb=nb, procs=procs, rm_directives='quarto').process()
    except BaseException as e:
        print(f'nbdev could not process {src.name}: {type(e).__name__}: {e}', file=sys.stderr)
        if not run: print('(nbdev re-runs cells with imports, exports and show_doc in a fresh namespace: keep imports in '
                          'their own cells, and define what show_doc cells need in exported cells)', file=sys.stderr)
        return 1
    repo_links(nb, src, get_config(src.parent), dst)
    write_nb(nb, dst)
    return 0


def collapse_cr(cell):
    """Show stream outputs as Jupyter does: a carriage return rewrites its line, so only the text after the last `\r`
    of a line stays (fastai's console progress bars collapse to their metrics table), and lines it empties go."""
    for o in cell.get('outputs', []) or []:
        if o.get('output_type') != 'stream': continue
        text = ''.join(o['text']) if isinstance(o['text'], list) else o['text']
        if '\r' not in text: continue
        lines = []
        for line in re.sub(r'\r+\n', '\n', text).split('\n'):
            if '\r' in line:
                line = line.split('\r')[-1].rstrip()
                if not line.strip(): continue
            lines.append(line)
        o['text'] = '\n'.join(lines).splitlines(True)


_re_mdlink = re.compile(r'(!\[[^\]]*\]\(|\]\()([^)\s]+)(\))')  # an image's `![alt](`, or the `](` of any other link


def repo_links(nb, src: Path, cfg, dst: Path | None = None):
    """Point markdown links to repository files outside `nbs/` (`../benchmarks/RESULTS.md`, or `benchmarks/RESULTS.md`
    written from the root as a README would) at the file on GitHub: the site has no copy of them. Images
    (`![plot](../benchmarks/schedules.png)`) are copied into the processed site instead, at their path in the repository,
    when `dst` (the processed notebook) is given, so that they show offline as on GitHub."""
    nbs, root = cfg.nbs_path.resolve(), cfg.config_path.resolve()
    base = f"{str(cfg.get('git_url', '')).rstrip('/')}/blob/{cfg.get('branch', 'main')}/"
    proc = None
    if dst is not None:  # the processed site's root: `dst` sits where `src` sits under `nbs/`
        depth = len(src.resolve().relative_to(nbs).parts)
        proc = dst.resolve().parents[depth - 1]

    def copy_in(f: Path) -> str:
        "Copy repository file `f` into the processed site (atomically: notebooks are processed in parallel); its link from `dst`"
        to = proc / f.relative_to(root)
        to.parent.mkdir(parents=True, exist_ok=True)
        tmp = to.with_name(f'.{to.name}.{os.getpid()}.tmp')
        shutil.copy2(f, tmp)
        os.replace(tmp, to)
        return Path(os.path.relpath(to, dst.resolve().parent)).as_posix()

    def fix(m):
        url = m.group(2)
        if re.match(r'^[a-zA-Z][\w+.-]*:|^#|^/', url): return m.group(0)
        path, _, frag = url.partition('#')
        if (src.parent / path).exists() and nbs in (src.parent / path).resolve().parents: return m.group(0)
        for cand in ((src.parent / path).resolve(), (root / path).resolve()):
            if cand.is_file() and root in cand.parents and nbs not in cand.parents:
                if m.group(1).startswith('!') and proc is not None: return m.group(1) + copy_in(cand) + m.group(3)
                return m.group(1) + base + cand.relative_to(root).as_posix() + ('#' + frag if frag else '') + m.group(3)
        return m.group(0)
    for c in nb.cells:
        if c.cell_type == 'markdown' and c.get('source'): c.source = _re_mdlink.sub(fix, c.source)


def proc_all(nbs: list[Path], src_nbs: Path, stage_nbs: Path, proc: Path, cfg, n_workers: int, allow_errors: bool, cell_timeout,
             run=True, exec_re: str = '') -> list[str]:
    "`proc_one` for each of `nbs` (paths relative to `src_nbs`), in parallel subprocesses; returns the names that failed."
    flags = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags or [])
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'), 'PYTHONUNBUFFERED': '1'}
    me = str(Path(__file__).resolve())
    run_all = run

    def one(p: Path, run=None):
        if run is None: run = run_all and bool(re.search(exec_re, str(p)))
        t0 = time.time()
        (proc / p).parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, me, '_proc', str(src_nbs / p), str(stage_nbs / p), str(proc / p), '--flags', ' '.join(flags)]
        if cell_timeout: cmd += ['--cell-timeout', str(cell_timeout)]
        if not run: cmd.append('--no-exec')
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=proc.parent)
        return p, r, time.time() - t0

    failed = []
    with ThreadPoolExecutor(max(1, n_workers)) as ex:  # the largest notebooks (usually the slowest) first
        futs = [ex.submit(one, p) for p in sorted(nbs, key=lambda p: -(src_nbs / p).stat().st_size)]
        for p, r, dt in (f.result() for f in as_completed(futs)):
            if r.returncode == 0:
                log(f'{"executed and processed" if "--no-exec" not in r.args else "processed"} {p} in {dt:.1f}s')
                continue
            failed.append(str(p))
            log(f'FAILED: {p} ({dt:.1f}s):\n{r.stderr[-6000:]}')
            if allow_errors and '--no-exec' not in r.args:  # the page without outputs; failing that, the notebook as it is
                if one(p, run=False)[1].returncode: shutil.copy2(src_nbs / p, proc / p)
            elif allow_errors: shutil.copy2(src_nbs / p, proc / p)
    if failed and not allow_errors:
        sys.exit(f'[build_docs] notebooks failed: {", ".join(failed)} (--allow-errors renders them anyway)')
    return failed


# ---------------------------------------------------------------------------------------------------------------------
# 3. Render, 4. post-process
# ---------------------------------------------------------------------------------------------------------------------
def front_matter(page: Path) -> dict:
    "YAML front matter of a processed page (nbdev writes it into the first raw cell of a notebook)."
    import yaml
    if page.suffix == '.ipynb':
        cells = json.loads(page.read_text(encoding='utf-8')).get('cells', [])
        text = ''.join(cells[0]['source']) if cells and cells[0]['cell_type'] == 'raw' else ''
    else: text = page.read_text(encoding='utf-8')
    m = re.match(r'\s*---\s*\n(.*?)\n---\s*(\n|$)', text, re.S)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


def output_names(proc: Path) -> dict[str, str]:
    "Map each page smalldocs writes (`99_config.html`) to the name Quarto gives it from `output-file` (`config.html`)."
    res = {}
    for p in sorted(proc.rglob('*')):
        rel = p.relative_to(proc)
        if p.suffix not in PAGE_EXTS or any(s.startswith(('_', '.')) for s in rel.parts): continue
        of = front_matter(p).get('output-file')
        if of and of != p.with_suffix('.html').name:
            res[rel.with_suffix('.html').as_posix()] = rel.with_name(of).as_posix()
    dup = [v for v in res.values() if list(res.values()).count(v) > 1 or (proc / v).with_suffix('.ipynb').exists()]
    if dup: sys.exit(f'[build_docs] two pages would be written to {sorted(set(dup))}')
    return res


_re_href = re.compile(r'''((?:href|src)=)(["'])(.*?)\2''')


def postprocess(site: Path, renames: dict[str, str], site_url: str):
    "Rename pages to their `output-file` names and rewrite links to them; make links into `site_url` relative."
    for old, new in renames.items():
        if (site / old).exists(): (site / old).rename(site / new)
        for ext in ('.llms.md',):
            o, n = site / (old[:-5] + ext), site / (new[:-5] + ext)
            if o.exists(): o.rename(n)
    base = site_url.rstrip('/') + '/' if site_url else None
    pats = [(re.compile(r'(?<![\w.%-])' + re.escape(posixpath.basename(o)[:-5]) + r'(\.html|\.llms\.md)(?![\w-])'),
             posixpath.basename(n)[:-5]) for o, n in renames.items()]

    def fix_names(s: str) -> str:
        for pat, stem in pats: s = pat.sub(lambda m: stem + m.group(1), s)
        return s

    for f in site.rglob('*'):
        if f.suffix not in ('.html', '.json', '.xml', '.md', '.txt') or 'site_libs' in f.parts: continue
        s = f.read_text(encoding='utf-8')
        new = fix_names(s) if pats else s
        if base and f.suffix == '.html':
            here = f.parent.relative_to(site).as_posix()

            def rel(m):
                url = m.group(3)
                if not url.startswith(base): return m.group(0)
                path, _, frag = url[len(base):].partition('#')
                if path.endswith('.html.md'): path = path[:-3]  # nbdev's module docs point at Quarto's markdown copy
                if path and not (site / path).exists(): return m.group(0)
                r = posixpath.relpath(path or 'index.html', here)
                return m.group(1) + m.group(2) + r + ('#' + frag if frag else '') + m.group(2)
            new = _re_href.sub(rel, new)
        if new != s: f.write_text(new, encoding='utf-8')


_re_math = re.compile(r'<span class="math (inline|display)">\\[(\[](.*?)\\[)\]]</span>', re.S)
_re_katex = re.compile(r'<link [^>]*katex[^>]*>|<script [^>]*katex[^>]*>\s*</script>|<script [^>]*auto-render[^>]*>\s*</script>')


def render_math(site: Path):
    """Pre-render the maths of each page as MathML (which browsers draw natively), so that formulas show offline.
    smalldocs writes maths as Pandoc does for KaTeX (`<span class="math display">\\[...\\]</span>`) and loads KaTeX
    from a CDN, which an offline reader, or a site behind a firewall, never gets: the TeX would show raw."""
    try: from latex2mathml.converter import convert
    except ImportError: sys.exit('[build_docs] latex2mathml is needed to render the maths offline: pip install latex2mathml (in the dev extra)')

    def mathml(m):
        kind, tex = m.group(1), html.unescape(m.group(2))
        try: out = convert(tex, display='block' if kind == 'display' else 'inline')
        except Exception as e:
            log(f'could not render the maths {tex!r}: {type(e).__name__}: {e}')
            return m.group(0)
        return f'<span class="math {kind}">{out}</span>'
    for f in site.rglob('*.html'):
        if 'site_libs' in f.parts: continue
        s = f.read_text(encoding='utf-8')
        new = _re_math.sub(mathml, s)
        if new != s: new = _re_katex.sub('', new)  # every formula is MathML now: no renderer to fetch
        if new != s: f.write_text(new, encoding='utf-8')


def check_links(site: Path) -> list[str]:
    """Links between the pages of the built site (and to its files) that do not resolve, anchors included, as
    `page: link (why)`. smalldocs checks links before `postprocess` renames the pages, so its own report is not used."""
    from urllib.parse import unquote, urlsplit
    ids, bad = {}, []

    def ids_of(p: Path) -> set:
        if p not in ids: ids[p] = set(re.findall(r'\sid="([^"]+)"', p.read_text(encoding='utf-8')))
        return ids[p]
    for f in sorted(site.rglob('*.html')):
        if 'site_libs' in f.parts or f.name.startswith('_'): continue
        for link in re.findall(r'(?:href|src)="([^"]*)"', f.read_text(encoding='utf-8')):
            u = urlsplit(html.unescape(link))
            if u.scheme or link.startswith(('//', 'data:', 'mailto:')): continue
            target = (f.parent / unquote(u.path)).resolve() if u.path else f.resolve()
            if target.is_dir(): target = target / 'index.html'
            name = f.relative_to(site).as_posix()
            if not target.exists(): bad.append(f'{name}: {link} (no such file)')
            elif u.fragment and target.suffix == '.html' and u.fragment not in ids_of(target):
                bad.append(f'{name}: {link} (no #{u.fragment} in {target.relative_to(site).as_posix()})')
    return bad


def render_smalldocs(proc: Path) -> Path:
    "Render `_proc` with smalldocs into its `output-dir`; returns it."
    r = subprocess.run([sys.executable, '-m', 'smalldocs.cli', 'render', '-q', str(proc)],
                       capture_output=True, text=True)
    for line in (r.stdout + r.stderr).splitlines():  # output-file: handled by `postprocess`; links: checked after it
        if line.strip() and 'output-file is not read' not in line and 'broken link' not in line: log('smalldocs:', line)
    if r.returncode: sys.exit(f'[build_docs] smalldocs render failed ({r.returncode})')
    return proc / '_docs'


def render_quarto(proc: Path, n_workers: int) -> Path:
    "Render `_proc` with real Quarto, exactly as `nbdev-docs` does."
    from nbdev.quarto_render import render_quarto as rq
    out = proc / '_docs'
    rq(proc, out, n_workers=n_workers)
    nav = out / 'site_libs/quarto-nav/quarto-nav.js'  # nbdev-docs' `_fix_quarto_nav`
    if nav.exists(): nav.write_text(nav.read_text().replace(r'.replace(/\/index\.html/, "/")', r'.replace(/\/index\.html(?=[?#]|$)/, "/")'))
    return out


def replace_dir(src: Path, dst: Path):
    "Put the built site `src` at `dst`, refusing to delete a `dst` that is not a built site."
    if dst == ROOT or dst in ROOT.parents or dst == Path.home(): sys.exit(f'[build_docs] refusing to replace {dst}')
    if dst.exists():
        if any(dst.iterdir()) and not (dst / 'site_libs').is_dir() and not (dst / 'search.json').exists():
            sys.exit(f'[build_docs] {dst} exists and is not a built site; not replacing it')
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))


# ---------------------------------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------------------------------
_hide_dirs = {'hide', 'export', 'exporti', 'default_exp'}


def readme_markdown(nb_path: Path, root: Path, cfg) -> tuple[dict, str]:
    """Front matter and body of `nb_path` for the README, as nbdev-readme reads it: the title and description from a
    raw `---` cell or the `# title` / `> description` markdown cell (which, as on the site, is left out of the body),
    then the markdown cells and the shown code cells, without `#|` directives or outputs. Symbols in backticks link
    to their pages, links to pages go to the site, and local files linked from `nbs/` get their path from the root."""
    from fastcore.nbio import cell_frontmatter, md_frontmatter, read_nb
    from nbdev.config import nbpath2html
    from nbdev.doclinks import NbdevLookup
    nb = read_nb(nb_path)
    site = (str(cfg.get('doc_host', '') or '') + str(cfg.get('doc_baseurl', '') or '')).rstrip('/')
    lookup = NbdevLookup()
    fm, parts = {}, []
    for c in nb.cells:
        src = c.source if isinstance(c.source, str) else ''.join(c.source)
        if c.cell_type == 'raw':
            d = cell_frontmatter(src)
            if d: fm.update(d)
            continue
        if c.cell_type == 'markdown':
            if 'title' not in fm and (d := md_frontmatter(src)):
                fm.update(d)
                continue
            parts.append(lookup.linkify(src))
        elif c.cell_type == 'code':
            lines, opts = src.splitlines(), {}
            while lines and lines[0].startswith('#|'):
                d = lines.pop(0)[2:].strip()
                k, sep, v = d.partition(':')
                if not sep: k, _, v = d.partition(' ')
                opts[k.strip()] = v.strip()
            if (opts.keys() & _hide_dirs) or opts.get('echo') == 'false' or opts.get('include') == 'false': continue
            code = '\n'.join(lines).strip('\n')
            if code.strip(): parts.append(f'```python\n{code}\n```')
    md = '\n\n'.join(p.strip('\n') for p in parts if p.strip()) + '\n'
    nbs_dir = nb_path.parent

    def fix_link(m):
        pre, url = m.group(1), m.group(2)
        if re.match(r'^[a-zA-Z][\w+.-]*:|^#|^/', url): return m.group(0)
        path, _, frag = url.partition('#')
        if site and Path(path).suffix in ('.ipynb', '.qmd', '.html', '.txt'):  # a page: on the site, as nbdev-readme links it
            page = nbpath2html(Path(path)) if path.endswith('.ipynb') else Path(path).with_suffix('.html') if path.endswith('.qmd') else Path(path)
            return f'{pre}({site}/{page.as_posix()}{"#" + frag if frag else ""})'
        if (nbs_dir / path).exists() and not (root / path).exists():  # a file beside the notebooks
            return f'{pre}({Path(os.path.relpath((nbs_dir / path).resolve(), root)).as_posix()}{"#" + frag if frag else ""})'
        return m.group(0)
    return fm, re.sub(r'(\]|!\[[^\]]*\])\(([^)\s]+)\)', fix_link, md)


def build_readme(root: Path, cfg, dest: Path | None = None) -> Path:
    "Write README.md (or `dest`) from the README notebook (`readme_nb`, default index.ipynb) with pandoc, as GitHub markdown."
    import pypandoc
    nb_path = cfg.nbs_path / (cfg.get('readme_nb') or 'index.ipynb')
    if not nb_path.exists(): sys.exit(f'[build_docs] no {nb_path} to build README.md from')
    fm, md = readme_markdown(nb_path, root, cfg)
    body = pypandoc.convert_text(md, 'gfm', format='markdown-smart-yaml_metadata_block-implicit_figures', extra_args=['--wrap=preserve'])
    rel = nb_path.relative_to(root).as_posix()
    head = [f"# {fm['title']}"] if fm.get('title') else []
    head.append(f'<!-- WARNING: THIS FILE WAS AUTOGENERATED FROM {rel}! DO NOT EDIT! Regenerate: python tools/build_docs.py --readme-only -->')
    if fm.get('description'): head.append(f"> {fm['description']}")
    text = '\n\n'.join(head + [body.strip('\n')]) + '\n'
    dest = dest or root / 'README.md'
    dest.write_text(text, encoding='utf-8')
    return dest


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------
def build_site(root: Path, out: Path, n_workers: int, execute_nbs=True, allow_errors=False, quarto=False,
               keep_stage: Path | None = None, cell_timeout=None, exec_re: str = '') -> Path:
    from nbdev.config import get_config
    cfg = get_config(root)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix='fasterprune-docs-')) if keep_stage is None else keep_stage
    if keep_stage is not None:
        marker = keep_stage / '.docs-stage'
        if keep_stage.exists() and any(keep_stage.iterdir()) and not marker.exists():
            sys.exit(f'[build_docs] --keep-stage {keep_stage} is not empty and not a previous stage; not emptying it')
        shutil.rmtree(keep_stage, ignore_errors=True); keep_stage.mkdir(parents=True); marker.touch()
    cwd = os.getcwd()
    try:
        stage_nbs = stage_project(root, tmp, cfg)
        nbs = nb_paths(stage_nbs)
        proc = prepare_proc(tmp, stage_nbs)
        proc_all(nbs, cfg.nbs_path, stage_nbs, proc, cfg, n_workers, allow_errors, cell_timeout or cfg.get('cell_timeout'), run=execute_nbs,
                 exec_re=exec_re)
        log(f'processed {len(nbs)} notebooks ({time.time() - t0:.0f}s)')
        if quarto: site = render_quarto(proc, n_workers)
        else:
            site = render_smalldocs(proc)
            postprocess(site, output_names(proc), str(cfg.get('doc_host', '') or '') + str(cfg.get('doc_baseurl', '') or ''))
            render_math(site)
        for b in check_links(site): log('broken link:', b)
        os.chdir(cwd)
        replace_dir(site, out)
    finally:
        os.chdir(cwd)
        if keep_stage is None: shutil.rmtree(tmp, ignore_errors=True)
    log(f'wrote {out} in {time.time() - t0:.0f}s')
    return out


def main(argv=None):
    if argv is None: argv = sys.argv[1:]
    if argv[:1] == ['_proc']:  # internal: execute and process one notebook (run in a subprocess by `proc_all`)
        p = argparse.ArgumentParser(prog='build_docs.py _proc')
        p.add_argument('src', type=Path); p.add_argument('staged', type=Path); p.add_argument('dst', type=Path)
        p.add_argument('--flags', default=''); p.add_argument('--cell-timeout', type=int, default=None)
        p.add_argument('--no-exec', action='store_true')
        a = p.parse_args(argv[1:])
        return proc_one(a.src, a.staged, a.dst, a.flags.split(), a.cell_timeout, run=not a.no_exec)
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, default=None, help='where to write the site (default: the doc_path of pyproject.toml, _docs/)')
    p.add_argument('--readme', action='store_true', help='also regenerate README.md from nbs/index.ipynb')
    p.add_argument('--readme-only', action='store_true', help='only regenerate README.md (no site, nothing executed)')
    p.add_argument('--no-exec', action='store_true', help='do not execute the notebooks (pages without outputs or plots)')
    p.add_argument('--exec-re', default='', help='execute only the notebooks whose path matches this regex (the others: no outputs)')
    p.add_argument('--allow-errors', action='store_true', help='render notebooks that fail to execute, without outputs')
    p.add_argument('--quarto', action='store_true', help='render with real Quarto instead of smalldocs (as the Pages workflow does)')
    p.add_argument('--n-workers', type=int, default=min(8, os.cpu_count() or 1), help='notebooks run in parallel (default: the CPUs, at most 8)')
    p.add_argument('--cell-timeout', type=int, default=None, help='seconds per cell (default: cell_timeout config, else none)')
    p.add_argument('--keep-stage', type=Path, default=None, help='stage in this folder and keep it (to inspect _proc)')
    a = p.parse_args(argv)
    from nbdev.config import get_config
    cfg = get_config(ROOT)
    if a.readme or a.readme_only: log(f'wrote {build_readme(ROOT, cfg)}')
    if a.readme_only: return 0
    out = (a.out or cfg.doc_path).resolve()
    build_site(ROOT, out, a.n_workers, execute_nbs=not a.no_exec, allow_errors=a.allow_errors, quarto=a.quarto,
               keep_stage=a.keep_stage.resolve() if a.keep_stage else None, cell_timeout=a.cell_timeout, exec_re=a.exec_re)
    return 0


if __name__ == '__main__': sys.exit(main())
