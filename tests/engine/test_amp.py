"""The fp16 loss scaler (the GPU AMP path's only stateful part), testable on CPU."""

from paddle_semoe.engine.amp import LossScaler, autocast, scaler_for
from paddle_semoe.engine.config import AmpConfig


def test_scale_halves_on_overflow_and_grows_after_clean_steps():
    s = LossScaler(scale=8.0, growth_interval=3, min_scale=1.0)
    s.update(found_inf=True)
    assert s.scale == 4.0 and s.clean_steps == 0
    for _ in range(3):
        s.update(found_inf=False)
    assert s.scale == 8.0 and s.clean_steps == 0
    for _ in range(5):
        s.update(found_inf=True)
    assert s.scale == 1.0 and s.at_minimum
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.clean_steps) == (s.scale, s.clean_steps)


def test_scaler_only_for_float16_and_no_autocast_when_off():
    assert scaler_for(AmpConfig(enabled=True, dtype="float16")) is not None
    assert scaler_for(AmpConfig(enabled=True, dtype="bfloat16")) is None
    assert scaler_for(AmpConfig(enabled=False, dtype="float16")) is None
    with autocast(AmpConfig(enabled=False)):
        pass
