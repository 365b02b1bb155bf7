"""Shared training infrastructure: config, freezing, optimiser, schedule, checkpoints, logging."""

import json
import math
import os
import platform
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from training import common


class _Net(torch.nn.Module):
    """Small model with dropout so that resume must restore the torch RNG stream too."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.drop(self.norm(self.encoder(x))))


def _write_yaml(tmp_path, text):
    path = tmp_path / 'cfg.yaml'
    path.write_text(text)
    return path


def test_load_config_with_overrides(tmp_path):
    path = _write_yaml(tmp_path, 'seed: 1\noptim:\n  lr: 0.001\nname: a\n')
    cfg = common.load_config(path, ['optim.lr=0.5', 'seed=7', 'optim.betas=[0.8, 0.9]',
                                    'name=run b'])
    assert cfg == {'seed': 7, 'optim': {'lr': 0.5, 'betas': [0.8, 0.9]}, 'name': 'run b'}
    with pytest.raises(KeyError, match='unknown config key'):
        common.load_config(path, ['sed=3'])
    with pytest.raises(ValueError, match='key=value'):
        common.load_config(path, ['seed'])
    with pytest.raises(FileNotFoundError):
        common.load_config(tmp_path / 'missing.yaml')


def test_seed_everything_reproduces_streams():
    common.seed_everything(5)
    first = (np.random.rand(), torch.rand(1).item())
    common.seed_everything(5)
    assert (np.random.rand(), torch.rand(1).item()) == first


def test_apply_freezing_patterns_and_presets():
    net = _Net()
    common.register_freeze_preset('test_encoder', ['encoder.*'])
    frozen, trainable = common.apply_freezing(net, ['preset:test_encoder', 're:^norm\\.'])
    assert frozen == 4 * 8 + 8 + 8 + 8
    assert trainable == 8 + 1
    assert not net.encoder.weight.requires_grad and net.head.weight.requires_grad
    with pytest.raises(ValueError, match='matched no parameter'):
        common.apply_freezing(_Net(), ['decoder.*'])
    with pytest.raises(KeyError, match='unknown freeze preset'):
        common.apply_freezing(_Net(), ['preset:nope'])


def test_build_optimizer_groups_and_no_decay():
    net = _Net()
    cfg = {'lr': 1e-3, 'weight_decay': 0.1,
           'param_groups': [{'name': 'enc', 'patterns': ['encoder'], 'lr': 1e-4}]}
    opt = common.build_optimizer(net, cfg)
    by_param = {}
    for group in opt.param_groups:
        for param in group['params']:
            by_param[id(param)] = (group['lr'], group['weight_decay'])
    assert by_param[id(net.encoder.weight)] == (1e-4, 0.1)
    assert by_param[id(net.encoder.bias)] == (1e-4, 0.0)
    assert by_param[id(net.head.weight)] == (1e-3, 0.1)
    assert by_param[id(net.norm.weight)] == (1e-3, 0.0)
    common.apply_freezing(net, ['encoder', 'norm', 'head'])
    with pytest.raises(ValueError, match='no trainable'):
        common.build_optimizer(net, cfg)


def test_scheduler_warmup_then_cosine():
    assert common.lr_factor(0, 4, 14) == pytest.approx(0.25)
    assert common.lr_factor(3, 4, 14) == pytest.approx(1.0)
    assert common.lr_factor(9, 4, 14) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert common.lr_factor(14, 4, 14) == pytest.approx(0.0)
    assert common.lr_factor(14, 4, 14, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert common.lr_factor(100, 4, 14, schedule='constant') == 1.0
    opt = torch.optim.AdamW(_Net().parameters(), lr=2.0)
    sched = common.build_scheduler(opt, {'warmup_steps': 2, 'total_steps': 10})
    assert opt.param_groups[0]['lr'] == pytest.approx(1.0)
    opt.step()
    sched.step()
    assert opt.param_groups[0]['lr'] == pytest.approx(2.0)
    with pytest.raises(ValueError, match='schedule'):
        common.build_scheduler(opt, {'total_steps': 10, 'schedule': 'step'})


def test_amp_is_off_on_cpu_and_precision_is_validated():
    cpu = torch.device('cpu')
    assert common.amp_dtype(cpu, 'bf16') is None
    with pytest.raises(ValueError, match='precision'):
        common.amp_dtype(cpu, 'int8')


def _train_steps(net, stepper, n, data):
    out = []
    for i in range(n):
        x, y = data[i]
        loss = torch.nn.functional.mse_loss(net(x), y)
        stepper.backward(loss)
        out.append(loss.item())
    return out


def test_gradient_accumulation_steps_every_n():
    net = _Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    stepper = common.GradientStepper(net, opt, accumulation_steps=2, clip_grad_norm=1.0)
    before = net.head.weight.detach().clone()
    x, y = torch.randn(3, 4), torch.randn(3, 1)
    assert stepper.backward(torch.nn.functional.mse_loss(net(x), y)) is False
    assert torch.equal(net.head.weight, before)
    assert stepper.backward(torch.nn.functional.mse_loss(net(x), y)) is True
    assert not torch.equal(net.head.weight, before)
    assert stepper.last_grad_norm is not None
    with pytest.raises(FloatingPointError):
        stepper.backward(torch.tensor(float('nan')))


def test_checkpoint_exact_resume(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 4, generator=gen), torch.randn(5, 1, generator=gen))
            for _ in range(6)]

    def make():
        common.seed_everything(3)
        net = _Net()
        opt = common.build_optimizer(net, {'lr': 1e-2})
        sched = common.build_scheduler(opt, {'warmup_steps': 2, 'total_steps': 6})
        return net, opt, sched, common.GradientStepper(net, opt, sched)

    net, opt, sched, stepper = make()
    _train_steps(net, stepper, 3, data)
    manager = common.CheckpointManager(tmp_path / 'run', metric='miou')
    saved = manager.save(net, opt, sched, step=3, metrics={'miou': 0.5},
                         extra={'gen': {'big': 2 ** 100}}, stepper=stepper)
    assert set(saved) == {'last', 'best'}
    expected = _train_steps(net, stepper, 3, data[3:])

    net2, opt2, sched2, stepper2 = make()
    torch.rand(7)  # disturb the RNG: the checkpoint must restore it
    info = common.load_checkpoint(tmp_path / 'run' / 'last', net2, opt2, sched2, stepper2)
    assert info['step'] == 3 and info['metrics'] == {'miou': 0.5}
    assert info['extra']['gen']['big'] == 2 ** 100
    assert sched2.last_epoch == sched.last_epoch - 3
    assert _train_steps(net2, stepper2, 3, data[3:]) == expected

    # best/ only moves on improvement
    manager.save(net, opt, sched, step=6, metrics={'miou': 0.4})
    best = json.loads((tmp_path / 'run' / 'best' / common.TRAINER_STATE).read_text())
    assert best['step'] == 3
    reopened = common.CheckpointManager(tmp_path / 'run', metric='miou')
    assert reopened.best_value == 0.5


def test_load_checkpoint_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match='not a training checkpoint'):
        common.load_checkpoint(tmp_path)


def test_mask_comparison_png(tmp_path):
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    true = np.zeros((20, 30), dtype=bool)
    true[5:10, 5:10] = True
    pred = np.zeros((20, 30), dtype=bool)
    pred[5:10, 20:25] = True
    path = common.save_mask_comparison(tmp_path / 'cmp.png', [image], [pred], [true], ['a'])
    grid = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    # Rows are enlarged 8x (nearest) to 160 px: image | truth | prediction.
    assert grid.shape == (18 + 160, 3 * 240, 3)
    # truth drawn green in the middle panel, prediction magenta in the right panel.
    assert tuple(grid[18 + 8 * 7, 240 + 8 * 7]) == (0, 127, 0)
    assert tuple(grid[18 + 8 * 7, 480 + 8 * 22]) == (127, 0, 127)
    assert tuple(grid[18 + 8 * 7, 480 + 8 * 7]) == (0, 0, 0)
    with pytest.raises(ValueError, match='shapes'):
        common.save_mask_comparison(tmp_path / 'x.png', [image], [pred[:5]], [true])


def test_loss_drop_pct():
    assert common.loss_drop_pct([4.0, 4.0, 3.0, 1.0, 1.0], window=2) == pytest.approx(75.0)
    with pytest.raises(ValueError):
        common.loss_drop_pct([1.0], window=1)


def test_scalar_logger_writes_event_file(tmp_path):
    logger = common.ScalarLogger(tmp_path / 'tb')
    logger.log({'loss': 1.5}, step=1, prefix='train')
    logger.close()
    assert list((tmp_path / 'tb').glob('events.out.tfevents.*'))


def test_check_cpu_kernels_warns_when_the_kernels_differ_from_the_recorded_ones():
    running = torch.backends.cpu.get_cpu_capability()
    cpu = torch.device('cpu')
    assert common.check_cpu_kernels({}, cpu) is None
    assert common.check_cpu_kernels({'cpu_kernels': running.lower()}, cpu) is None
    assert common.check_cpu_kernels({'cpu_kernels': 'AVX2'}, torch.device('cuda')) is None
    other = 'AVX2' if running != 'AVX2' else 'AVX512'
    warning = common.check_cpu_kernels({'cpu_kernels': other}, cpu)
    assert f'runs {running} CPU kernels' in warning and f'trained with {other}' in warning
    assert ('ATEN_CPU_CAPABILITY=avx2' in warning) == (other == 'AVX2')


@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64'),
                    reason='AVX2 kernels exist on x86 CPUs only')
def test_documented_environment_selects_avx2_kernels():
    # The hint check_cpu_kernels gives must really switch PyTorch to its AVX2 kernels.
    env = dict(os.environ, **dict(item.split('=') for item in
                                  common.CPU_KERNEL_ENV['AVX2'].split()))
    out = subprocess.run([sys.executable, '-c', 'import torch; '
                          'print(torch.backends.cpu.get_cpu_capability())'],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ('AVX2', 'DEFAULT')  # DEFAULT: a CPU without AVX2


def _schema():
    return {'seed': 0, 'train': {'steps': 10, 'lr': 0.1},
            'prompts': {'probabilities': {'points': 0.5, 'box': 0.5}},
            'model': {'tiny': common.OPEN}}


def test_config_keys_are_checked_against_the_schema_at_every_depth(tmp_path):
    schema = _schema()
    path = _write_yaml(tmp_path, 'seed: 1\ntrain:\n  steps: 5\nmodel:\n  tiny: {anything: 1}\n')
    cfg = common.load_config(path, ['train.steps=7', 'model.tiny.width=3'], schema)
    assert cfg['train']['steps'] == 7 and cfg['model']['tiny'] == {'anything': 1, 'width': 3}
    with pytest.raises(KeyError, match=r"unknown config key 'train\.setps' \(did you mean "
                                       r"'train\.steps'\?\)"):
        common.load_config(path, ['train.setps=2'], schema)
    with pytest.raises(KeyError, match=r"'train\.steps' is a value"):
        common.load_config(path, ['train.steps.max=2'], schema)
    with pytest.raises(KeyError, match="--set 'prompts.probabilities.bx=1'"):
        common.load_config(path, ['prompts.probabilities.bx=1'], schema)
    for text, wrong in [('trian:\n  steps: 2\n', "'trian' (did you mean 'train'?)"),
                        ('train:\n  setps: 2\n', "'train.setps' (did you mean 'train.steps'?)"),
                        ('prompts:\n  probabilities: {pionts: 1}\n',
                         "'prompts.probabilities.pionts'")]:
        typo = tmp_path / 'typo.yaml'
        typo.write_text(text)
        with pytest.raises(KeyError) as info:
            common.load_config(typo, [], schema)
        assert wrong in str(info.value) and str(typo) in str(info.value)
    with pytest.raises(ValueError, match="'train' must be a mapping"):
        common.load_config(path, ['train=3'], schema)


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    schema = _schema()
    path = _write_yaml(tmp_path, 'train:\n  lr: 1e-4\n  steps: 10\n')
    cfg = common.load_config(path, ['prompts.probabilities.box=5e-1', 'seed=1E3'], schema)
    assert cfg['train']['lr'] == pytest.approx(1e-4)
    assert cfg['prompts']['probabilities']['box'] == 0.5
    assert cfg['seed'] == 1000.0
    # Words stay words.
    assert common.load_config(path, ['train.lr=e5'])['train']['lr'] == 'e5'


def test_fresh_run_refuses_an_output_dir_with_an_earlier_run(tmp_path, capsys):
    out = tmp_path / 'run'
    assert common.claim_output_dir(out) == out and out.is_dir()  # new: created
    (out / 'cfg.yaml').write_text('seed: 0\n')  # not a run artefact: no reason to refuse
    common.claim_output_dir(out)
    for name in ('best', 'eval', 'tensorboard'):
        (out / name).mkdir()
        (out / name / 'old').write_text('x')
    (out / 'summary.json').write_text('{}')
    (out / 'synthetic_data').mkdir()
    with pytest.raises(FileExistsError, match=r'best, eval, tensorboard, summary\.json.*'
                                              r'--resume .*--overwrite'):
        common.claim_output_dir(out)
    net = _Net()
    common.CheckpointManager(tmp_path / 'saved', 'miou').save(
        net, common.build_optimizer(net, {'lr': 1e-3}), None, step=1)
    shutil.copytree(tmp_path / 'saved' / 'last', out / 'last')
    common.claim_output_dir(out, resume=str(out / 'last'))  # resuming continues that run
    assert (out / 'best' / 'old').exists()
    with pytest.raises(ValueError, match='exclude each other'):
        common.claim_output_dir(out, resume=str(out / 'last'), overwrite=True)
    common.claim_output_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ['cfg.yaml', 'synthetic_data']
    assert 'deleted last, best, eval, tensorboard, summary.json' in capsys.readouterr().out
    args = common.build_arg_parser('x').parse_args(['--config', 'c.yaml', '--overwrite'])
    assert args.overwrite and args.resume is None
    with pytest.raises(SystemExit):
        common.build_arg_parser('x').parse_args(['--config', 'c', '--overwrite', '--resume', 'd'])


def test_a_nan_metric_does_not_block_best(tmp_path):
    # SAM3's val_loss is NaN for a diverged model or an evaluation with nothing to score.
    net = _Net()
    opt = common.build_optimizer(net, {'lr': 1e-2})
    manager = common.CheckpointManager(tmp_path / 'run', metric='val_loss', mode='min')
    assert set(manager.save(net, opt, None, step=0, metrics={'val_loss': float('nan')})) == {
        'last', 'best'}   # an empty best/ is still filled
    assert 'best' in manager.save(net, opt, None, step=1, metrics={'val_loss': 2.0})
    assert 'best' not in manager.save(net, opt, None, step=2, metrics={'val_loss': float('nan')})
    assert 'best' in manager.save(net, opt, None, step=3, metrics={'val_loss': 1.0})
    best = json.loads((tmp_path / 'run' / 'best' / common.TRAINER_STATE).read_text())
    assert best['step'] == 3


def test_resume_refuses_a_changed_config_and_another_runs_output_dir(tmp_path):
    net = _Net()
    opt = common.build_optimizer(net, {'lr': 1e-3})
    cfg = {'output_dir': 'a', 'optim': {'lr': 1e-3}, 'train': {'steps': 10, 'stop_at_step': 0}}
    run_a, run_b = tmp_path / 'a', tmp_path / 'b'
    common.CheckpointManager(run_a, 'miou').save(net, opt, None, step=2,
                                                 extra=common.run_identity('run-a', cfg))
    # Where and how long it runs may change; what it trains may not (the optimizer state
    # would bring the saved lr back and the schedule would bend).
    common.claim_output_dir(run_a, resume=run_a / 'last',
                            config=dict(cfg, output_dir='x', train={'steps': 10,
                                                                    'stop_at_step': 5}))
    changed = dict(cfg, optim={'lr': 0.1}, train={'steps': 20, 'stop_at_step': 0})
    with pytest.raises(ValueError, match=r'optim\.lr: 0\.001 -> 0\.1; train\.steps: 10 -> 20'):
        common.claim_output_dir(run_a, resume=run_a / 'last', config=changed)
    # Resuming run a into the directory of run b would replace b's last/ and best/.
    common.CheckpointManager(run_b, 'miou').save(net, opt, None, step=1,
                                                 extra=common.run_identity('run-b', cfg))
    with pytest.raises(FileExistsError, match='holds another training run'):
        common.claim_output_dir(run_b, resume=run_a / 'last', config=cfg)
    # A new directory, or a copy of the run's own last/, is fine.
    common.claim_output_dir(tmp_path / 'c', resume=run_a / 'last', config=cfg)
    shutil.copytree(run_a / 'last', tmp_path / 'backup')
    common.claim_output_dir(run_a, resume=tmp_path / 'backup', config=cfg)


def test_rng_restore_skips_gpus_that_are_no_longer_visible(monkeypatch):
    # Saved with two GPUs visible, resumed with CUDA_VISIBLE_DEVICES=0: the second state has
    # no device (torch raised IndexError 'tuple index out of range' inside load_checkpoint).
    state = common.capture_rng_state()
    state['cuda'] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    restored = []

    def set_rng_state(new_state, device='cuda'):
        index = device if isinstance(device, int) else 0
        if index >= 1:
            raise IndexError('tuple index out of range')
        restored.append((index, int(new_state[0])))

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', set_rng_state)
    monkeypatch.setattr(torch.cuda.random, 'set_rng_state', set_rng_state)
    common.restore_rng_state(state)
    assert restored == [(0, 0)]


def test_resume_from_a_model_directory_is_refused_before_anything_is_written(tmp_path):
    # A model directory (weights, no training state) passed to --resume by mistake: the run
    # used to write config.json and tensorboard/ first, and then refuse every fresh run.
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    (model_dir / 'config.json').write_text('{}')
    out = tmp_path / 'out'
    with pytest.raises(FileNotFoundError, match=r"not a training checkpoint: no "
                       r"training_state.pt .* --set model.pretrained_dir="):
        common.claim_output_dir(out, resume=model_dir, config={'optim': {'lr': 1e-3}})
    assert not out.exists()


def test_null_in_a_config_or_override_means_the_default(tmp_path):
    # Left in as None, it reached the trainers' cfg.get(key, default): int(None) failed.
    path = _write_yaml(tmp_path, 'seed: 1\noptim:\n  lr: null\n  eps: 1.0e-6\neval:\n')
    cfg = common.load_config(path, ['optim.eps=null', 'seed=null'])
    assert cfg == {'optim': {}}


def test_a_crash_while_a_checkpoint_is_replaced_leaves_a_whole_one(tmp_path, monkeypatch):
    net = _Net()
    opt = common.build_optimizer(net, {'lr': 1e-3})
    out = tmp_path / 'run'
    common.CheckpointManager(out, 'miou').save(net, opt, None, step=1, metrics={'miou': 0.5})
    real_replace = os.replace

    def crash_on_the_new_best(source, target):
        if str(source).endswith('best.tmp'):
            raise OSError('power cut (injected)')
        real_replace(source, target)

    monkeypatch.setattr(os, 'replace', crash_on_the_new_best)
    with pytest.raises(OSError, match='power cut'):
        common.CheckpointManager(out, 'miou').save(net, opt, None, step=2,
                                                   metrics={'miou': 0.9})
    monkeypatch.setattr(os, 'replace', real_replace)
    # best/ used to be deleted before its replacement was renamed in: gone with its score.
    assert common.CheckpointManager(out, 'miou').best_value == 0.5
    assert (out / 'best' / common.TRAINER_STATE).is_file()
    # A crash between last/ going to last.old and last.tmp coming in: resume finds it.
    os.replace(out / 'last', out / 'last.old')
    assert common.load_checkpoint(out / 'last', net, opt)['step'] == 2
    os.replace(out / 'last', out / 'last.old')
    common.claim_output_dir(out, resume=out / 'last')  # the check before a resume, too
    assert (out / 'last' / common.TRAINER_STATE).is_file() and not (out / 'last.old').exists()


def test_a_checkpoint_is_on_disk_before_the_renames_publish_it(tmp_path, monkeypatch):
    # Without fsync a power cut could leave last/ renamed in with files never written.
    net = _Net()
    opt = common.build_optimizer(net, {'lr': 1e-3})
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(('fsync', os.readlink(f'/proc/self/fd/{descriptor}')))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(('replace', str(source), str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    common.CheckpointManager(tmp_path / 'run', 'miou').save(net, opt, None, step=1)
    tmp = str(tmp_path / 'run' / 'last.tmp')
    publish = events.index(('replace', tmp, str(tmp_path / 'run' / 'last')))
    synced = {event[1] for event in events[:publish] if event[0] == 'fsync'}
    written = {str(path).replace('/last/', '/last.tmp/')
               for path in (tmp_path / 'run' / 'last').rglob('*') if path.is_file()}
    assert written and written <= synced and tmp in synced
    assert ('fsync', str(tmp_path / 'run')) in events[publish:]
