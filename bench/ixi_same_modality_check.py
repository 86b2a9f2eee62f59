"""Same-modality behaviour of the `iterative` defaults: Dice on the first 3 IXI test pairs of
``bench/results/evaluate_iterative_test10_results.csv`` (the ``csv`` column), run with the code of the
current directory. Run it from two checkouts to compare before / after a change::

    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 nice -n 10 .venv/bin/python bench/ixi_same_modality_check.py
"""
import sys, os, csv, time
sys.path.insert(0, os.getcwd())
from app.engine import io
from app.engine.evaluation import register_and_measure
rows = list(csv.DictReader(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'evaluate_iterative_test10_results.csv'))))[:3]
for r in rows:
    f = r['fixed'].replace('../shared', '/work/shared'); m = r['moving'].replace('../shared', '/work/shared')
    seg = lambda p: p.replace('/t1/', '/seg/').replace('_T1.nii.gz', '_T1_DLMUSE.nii.gz')
    fixed, moving = io.read_volume(f), io.read_volume(m)
    fl, ml = io.read_labels(seg(f)), io.read_labels(seg(m))
    t0 = time.process_time()
    res, met = register_and_measure('iterative', fixed, moving, {}, fixed_labels=fl, moving_labels=ml)
    ch = res.params['chosen']
    print(os.path.basename(f), os.path.basename(m), 'dice', round(met['dice_mean'], 4), 'csv', round(float(r['dice_mean']), 4),
          'multi', ch['multimodal'], ch.get('rigid_starts'), [g['kept'] for g in ch['guards']], 'cpu', round(time.process_time() - t0, 1), flush=True)
