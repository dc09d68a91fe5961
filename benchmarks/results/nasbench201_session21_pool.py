"""Pooled paired differences of the session-21 held-out runs: python nasbench201_session21_pool.py EVO_FILES RL_FILES (comma-separated jsonl); per data set: each file, then all pooled. new = end4k2 (the default since session 21), old = default without re-evaluation."""
import json, sys, math, statistics
def load(f): return [json.loads(l) for l in open(f)]
def diff(rows, a, b):
    d=[r[a]-r[b] for r in rows]; m=statistics.fmean(d); se=statistics.stdev(d)/math.sqrt(len(d))
    w=sum(x>0 for x in d); l=sum(x<0 for x in d); return m,se,w,len(d)-w-l,l
def verdict(m,se): return "not shown" if abs(m)<1.96*se else ("better" if m>0 else "worse")
for name, files in (("evolution", sys.argv[1].split(",")), ("rl", sys.argv[2].split(","))):
    parts=[load(f) for f in files if f]
    if not parts or not all(parts): continue
    for ds in ("CIFAR-10","CIFAR-100","ImageNet16-120"):
        cells=[]
        for rows in parts+[sum(parts,[])]:
            rs=[r for r in rows if r["dataset"]==ds]
            if not rs: cells.append("-"); continue
            m,se,w,t,l=diff(rs,"end4k2","tpe"); m0,se0,*_=diff(rs,"default","tpe"); g,gse,*_=diff(rs,"end4k2","default")
            cells.append(f"{m:+.3f} +- {se:.3f} ({w}/{t}/{l}, {verdict(m,se)}; n={len(rs)}) [old {m0:+.3f}+-{se0:.3f}; gain {g:+.3f}+-{gse:.3f}; new {statistics.fmean(r['end4k2'] for r in rs):.3f} tpe {statistics.fmean(r['tpe'] for r in rs):.3f}]")
        print(name, ds, " | ".join(cells))
