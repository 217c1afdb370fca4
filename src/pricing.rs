//! The price table behind each AI usage row's cost: USD per million input and output tokens, and
//! per audio minute. Defaults are OpenAI's list prices; `ORBIT_PRICE_TABLE` (JSON) overrides or
//! adds models.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
pub struct Price {
    #[serde(default)]
    pub input_per_1m: f64,
    #[serde(default)]
    pub output_per_1m: f64,
    #[serde(default)]
    pub per_audio_minute: f64,
}

#[derive(Debug, Clone)]
pub struct PriceTable(HashMap<String, Price>);

impl Default for PriceTable {
    fn default() -> Self {
        let p = |i, o| Price {
            input_per_1m: i,
            output_per_1m: o,
            per_audio_minute: 0.0,
        };
        PriceTable(HashMap::from([
            ("gpt-4o".into(), p(2.50, 10.00)),
            ("gpt-4o-mini".into(), p(0.15, 0.60)),
            ("gpt-4.1".into(), p(2.00, 8.00)),
            ("gpt-4.1-mini".into(), p(0.40, 1.60)),
            ("text-embedding-3-small".into(), p(0.02, 0.0)),
            ("text-embedding-3-large".into(), p(0.13, 0.0)),
            (
                "whisper-1".into(),
                Price {
                    per_audio_minute: 0.006,
                    ..Default::default()
                },
            ),
        ]))
    }
}

impl PriceTable {
    /// The defaults with `json` (`{"model": {"input_per_1m": …}}`) laid over them.
    pub fn with_overrides(json: Option<&str>) -> anyhow::Result<Self> {
        let mut t = PriceTable::default();
        if let Some(j) = json {
            let extra: HashMap<String, Price> =
                serde_json::from_str(j).map_err(|e| anyhow::anyhow!("ORBIT_PRICE_TABLE: {e}"))?;
            t.0.extend(extra);
        }
        Ok(t)
    }

    /// The price of `model`; a dated snapshot (`gpt-4o-2024-08-06`) falls back to its family.
    pub fn get(&self, model: &str) -> Option<Price> {
        if let Some(p) = self.0.get(model) {
            return Some(*p);
        }
        // Longest known name that the snapshot starts with.
        self.0
            .iter()
            .filter(|(k, _)| model.starts_with(&format!("{k}-")))
            .max_by_key(|(k, _)| k.len())
            .map(|(_, p)| *p)
    }

    /// USD for one call; an unknown model costs 0 (and the row still records its tokens).
    pub fn cost(&self, model: &str, input: i64, output: i64, audio_seconds: f64) -> f64 {
        let Some(p) = self.get(model) else { return 0.0 };
        (input as f64 * p.input_per_1m + output as f64 * p.output_per_1m) / 1e6
            + audio_seconds / 60.0 * p.per_audio_minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_fall_back_to_family() {
        let t = PriceTable::default();
        assert_eq!(t.get("gpt-4o-2024-08-06"), t.get("gpt-4o"));
        assert_eq!(t.get("gpt-4o-mini-2024-07-18"), t.get("gpt-4o-mini"));
        assert!((t.cost("gpt-4o-mini", 1_000_000, 1_000_000, 0.0) - 0.75).abs() < 1e-9);
        assert!((t.cost("whisper-1", 0, 0, 90.0) - 0.009).abs() < 1e-9);
        assert_eq!(t.cost("unknown", 10, 10, 0.0), 0.0);
        let t = PriceTable::with_overrides(Some(r#"{"local-llm": {"input_per_1m": 1}}"#)).unwrap();
        assert!((t.cost("local-llm", 2_000_000, 0, 0.0) - 2.0).abs() < 1e-9);
    }
}
