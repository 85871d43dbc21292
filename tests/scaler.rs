//! `--fp16`'s loss scaler against torch.amp.GradScaler: the found-inf
//! sequences of tests/fixtures/gradscaler.json (scripts/gradscaler_fixture.py
//! ran the real scaler on them), replayed; the scale and growth tracker must
//! match after every update, bit for bit.

use clip_wgpu::train::scaler::GradScaler;
use serde_json::Value;

#[test]
fn replays_torch_gradscaler_exactly() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gradscaler.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    let mut grew = 0;
    for (c, case) in cases.iter().enumerate() {
        let p = &case["params"];
        let f = |k: &str| p[k].as_f64().unwrap() as f32;
        let mut s = GradScaler::new(
            f("init_scale"),
            f("growth_factor"),
            f("backoff_factor"),
            p["growth_interval"].as_u64().unwrap() as u32,
        );
        if c == 0 {
            assert_eq!(s, GradScaler::default(), "case 0 is PyTorch's defaults");
        }
        let flags = case["found_inf"].as_array().unwrap();
        let mut infs = 0;
        for (i, inf) in flags.iter().enumerate() {
            let inf = inf.as_bool().unwrap();
            // torch skipped the optimizer step exactly on the inf steps.
            assert_eq!(
                case["stepped"][i].as_bool(),
                Some(!inf),
                "case {c} step {i}"
            );
            let before = s.scale;
            s.update(inf);
            infs += u64::from(inf);
            let want = case["scale"][i].as_f64().unwrap();
            assert_eq!(s.scale as f64, want, "case {c} step {i}: scale");
            assert_eq!(
                s.growth_tracker as u64,
                case["growth_tracker"][i].as_u64().unwrap(),
                "case {c} step {i}: growth tracker"
            );
            grew += usize::from(s.scale > before);
        }
        assert_eq!(s.skipped_steps, infs, "case {c}");
    }
    assert!(grew >= 5, "the fixture exercises growth ({grew} growths)");
}
