"The one place that writes a benchmark's section of RESULTS.md, leaving the other sections as they are"
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / 'RESULTS.md'


def write_section(section:str, text:str, path:Path=RESULTS):
    "Replace the section of `path` under the heading line `section` with `text` (which starts with that heading), or append it"
    old = path.read_text() if path.exists() else '# Benchmark results\n'
    body = text.rstrip('\n') + '\n'
    pat = re.compile(rf'^{re.escape(section)}\n.*?(?=^## |\Z)', re.S | re.M)
    new = pat.sub(lambda _: body + '\n', old) if pat.search(old) else old.rstrip('\n') + '\n\n' + body
    path.write_text(new.rstrip('\n') + '\n')
    print(f'wrote {path}')
