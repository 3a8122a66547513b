"The command line, `python -m fasterprune` (fasterprune.demo `main`, nbs/80_demo.ipynb): every argument checked before any training, errors reported as argparse does; and 'filter' on the demo keeps every class"
import subprocess, sys, warnings

import pytest
import torch

import fasterprune.demo as demo
from fasterprune.criteria import criteria
from fasterprune.granularities import known_granularities


@pytest.fixture
def no_training(monkeypatch):
    "Any training fails the test: errors must come before it"
    def trained(*args, **kwargs): raise AssertionError('the demo started training')
    monkeypatch.setattr(demo, 'run_demo', trained)

def cli(argv, capsys):
    "Exit code and stderr lines of `main(argv)`, which must exit"
    with pytest.raises(SystemExit) as e: demo.main(argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()

BAD = { # argv: (what the error line says, what it must not say)
    'nm_reversed': (['--granularity', '4:2'], ['argument --granularity', 'N:M pattern needs 0 < N < M'], ['layer']),
    'nm_zero': (['--granularity', '0:4'], ['argument --granularity', 'N:M pattern needs 0 < N < M'], ['layer']),
    'nm_letters': (['--granularity', 'a:b'], ['argument --granularity', 'not an N:M pattern', "'2:4'"], ['layer']),
    'granularity_unknown': (['--granularity', 'block'], ['argument --granularity', "'block' is unknown", 'filter'], []),
    'epochs_negative': (['--epochs', '-1'], ['argument --epochs', '>= 1'], []),
    'epochs_zero': (['--epochs', '0'], ['argument --epochs', '>= 1'], []),
    'epochs_text': (['--epochs', 'ten'], ['argument --epochs', 'not a whole number'], []),
    'lr_negative': (['--lr', '-1'], ['argument --lr', '> 0'], []),
    'lr_zero': (['--lr', '0'], ['argument --lr', '> 0'], []),
    'lr_nan': (['--lr', 'nan'], ['argument --lr', '> 0'], []),
    'sparsity_above_one': (['--sparsity', '1.5'], ['argument --sparsity', 'outside [0, 1]'], ['0.015', 'did you mean']),
    'sparsity_percent': (['--sparsity', '90'], ['argument --sparsity', 'did you mean 0.9?'], []),
    'sparsity_text': (['--sparsity', 'most'], ['argument --sparsity', 'not a number'], []),
    'criterion_unknown': (['--criterion', 'magnitude'], ['argument --criterion', 'invalid choice', 'lookahead_bn'], []),
    'schedule_unknown': (['--schedule', 'linear'], ['argument --schedule', 'invalid choice', 'one_cycle'], []),
    'scope_unknown': (['--scope', 'layer'], ['argument --scope', 'invalid choice'], []),
    'threads_zero': (['--threads', '0'], ['argument --threads', '>= 1'], []),
    'nm_out_of_reach': (['--granularity', '2:4', '--sparsity', '0.9'], ["above what '2:4' can reach", '0.5'], []), # found by the engine
}

@pytest.mark.parametrize('case', list(BAD))
def test_bad_value_is_one_argparse_error_before_training(case, capsys, no_training):
    argv, says, not_says = BAD[case]
    code, lines = cli(argv, capsys)
    assert code == 2
    assert lines[0].startswith('usage:') and lines[-1].split(': ', 1)[1].startswith('error: ') # argparse's usage, then one error line
    assert sum('error' in l for l in lines) == 1 and not any('Traceback' in l for l in lines)
    for s in says: assert s in lines[-1], (s, lines[-1])
    for s in not_says: assert s not in lines[-1], (s, lines[-1])

def test_help_lists_every_criterion_and_granularity(capsys):
    with pytest.raises(SystemExit) as e: demo.main(['--help'])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in [*criteria, 'lookahead', 'lookahead_bn', *known_granularities()[:-1], 'N:M', '2:4']: assert name in out, name
    for opt in ('--sparsity', '--schedule', '--granularity', '--criterion', '--scope', '--epochs', '--lr', '--threads', '--seed'): assert opt in out

@pytest.mark.parametrize('kwargs', [dict(epochs=0), dict(epochs=-1), dict(lr=-1.), dict(lr=0), dict(granularity='4:2'),
                                    dict(granularity='a:b'), dict(granularity='2:4', sparsity=0.9), dict(sparsity=1.5)])
def test_run_demo_checks_before_training(kwargs, monkeypatch):
    "The Python API stops with a ValueError before the dense run"
    def trained(*args, **kw): raise AssertionError('the demo started training')
    monkeypatch.setattr(demo.Learner, 'fit', trained)
    with pytest.raises(ValueError): demo.run_demo(**kwargs)

def test_python_m_fasterprune_reports_like_argparse():
    "The real command: exit code 2, the usage and one error line on stderr, no traceback, no warning of fasterprune's"
    r = subprocess.run([sys.executable, '-m', 'fasterprune', '--granularity', '4:2'], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == ''
    assert 'usage: python -m fasterprune' in r.stderr and lines[-1].startswith('python -m fasterprune: error: argument --granularity')
    assert sum('error:' in l for l in lines) == 1 and 'Traceback' not in r.stderr and 'fasterprune/' not in r.stderr, r.stderr


def test_default_target_fits_the_granularity():
    "Without `--sparsity`, each granularity removes about 90% of the weights, and an N:M pattern runs at its ceiling"
    assert [demo.check_demo_args(granularity=g)[0] for g in ('weight', 'kernel', 'filter', 'channel', '2:4')] == [0.9, 0.9, 0.7, 0.7, 0.5]
    assert demo.check_demo_args(0.8, granularity='filter')[0] == 0.8 # a given target is kept

def test_filter_keeps_every_class():
    "`python -m fasterprune --granularity filter` (3 epochs here): the classifier keeps its rows and every digit is still predicted"
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r = demo.run_demo(granularity='filter', epochs=3)
    rep = r['report'].set_index('name')
    assert rep.loc['fc', 'weight_sparsity'] == 0 and rep.loc['fc', 'note'] # the output layer is left dense, and says why
    assert r['pruned_classes'] == 10 and r['pruned'] > r['dense'] - 0.1, r
    assert abs(r['sparsity'] - 0.7) < 0.02 # the convs reach the target: the share of filters pruned


def test_python_m_fasterprune_shows_progress_and_no_third_party_warning():
    "The real command prints a line per epoch of each fit (not with `--quiet`), and starts without fastai's torch.jit FutureWarning"
    r = subprocess.run([sys.executable, '-m', 'fasterprune', '--epochs', '1'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'Warning' not in r.stderr, r.stderr
    epochs = [l.split()[0] for l in r.stdout.splitlines() if ' epoch 1/1 ' in l]
    assert epochs == ['dense', 'pruned'], r.stdout
    assert 'pruned accuracy' in r.stdout


def test_warning_filter_is_narrow():
    "The filter of `python -m fasterprune` ignores only torch's own `torch.jit.script` FutureWarning: the same words from anywhere else still show"
    code = ("import warnings, fasterprune.__main__\n"
            "warnings.warn('`torch.jit.script` is deprecated. Please switch to `torch.compile`', FutureWarning)\n"
            "warnings.warn('my own', FutureWarning)\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count('FutureWarning') == 2 and 'my own' in r.stderr, r.stderr
