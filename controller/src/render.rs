//! Rendering the policy for a canary weight: the base policy document with the driven
//! split rule's weights replaced, and nothing else touched.

use meshcanary_policy::Policy;
use serde_json::{json, Value};

/// Weights are written in basis points: 10,000 is the whole, so a step of 5 % is 500.
pub const WHOLE: u64 = 10_000;

/// The base policy with the split rule `rule` giving `canary_percent` % to `canary` and
/// the rest to the other variants in proportion to their base weights (equally when
/// those are all zero). The canary is listed first, so raising its weight only ever
/// moves users into it. The result is validated by the policy core.
pub fn with_canary_weight(
    base: &Value,
    rule: &str,
    canary: &str,
    canary_percent: u32,
) -> Result<Value, String> {
    let mut document = base.clone();
    let rules = document
        .get_mut("rules")
        .and_then(Value::as_array_mut)
        .ok_or("the policy has no rules")?;
    let split = rules
        .iter_mut()
        .find(|r| r.get("name").and_then(Value::as_str) == Some(rule))
        .and_then(|r| r.get_mut("split"))
        .ok_or_else(|| format!("the policy has no split rule {:?}", rule))?;
    let base_weights: Vec<(String, u64)> = split
        .get("weights")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("rule {:?} has no weights", rule))?
        .iter()
        .filter_map(|w| {
            Some((
                w.get("variant")?.as_str()?.to_string(),
                w.get("weight")?.as_u64()?,
            ))
        })
        .filter(|(v, _)| v != canary)
        .collect();
    if base_weights.is_empty() {
        return Err(format!(
            "rule {:?} has no baseline variant besides {:?}",
            rule, canary
        ));
    }
    let canary_bp = u64::from(canary_percent.min(100)) * WHOLE / 100;
    let shares = apportion(
        WHOLE - canary_bp,
        &base_weights.iter().map(|(_, w)| *w).collect::<Vec<_>>(),
    );
    let mut weights = vec![json!({"variant": canary, "weight": canary_bp})];
    weights.extend(
        base_weights
            .iter()
            .zip(shares)
            .map(|((variant, _), share)| json!({"variant": variant, "weight": share})),
    );
    split["weights"] = Value::Array(weights);
    Policy::from_value(&document).map_err(|e| format!("the rendered policy is invalid: {}", e))?;
    Ok(document)
}

/// Splits `total` in proportion to `weights` (largest remainder, so the parts add up
/// exactly); equal parts when every weight is zero.
fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let equal = weights.iter().all(|w| *w == 0);
    let weights: Vec<u128> = weights
        .iter()
        .map(|w| if equal { 1 } else { u128::from(*w) })
        .collect();
    let sum: u128 = weights.iter().sum();
    let exact: Vec<(u64, u128)> = weights
        .iter()
        .map(|w| {
            let scaled = u128::from(total) * w;
            ((scaled / sum) as u64, scaled % sum)
        })
        .collect();
    let mut parts: Vec<u64> = exact.iter().map(|(q, _)| *q).collect();
    let mut left = total - parts.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|a, b| exact[*b].1.cmp(&exact[*a].1).then(a.cmp(b)));
    for i in order {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({
            "name": "checkout",
            "variants": ["stable", "canary", "blue"],
            "rules": [
                {"name": "qa", "when": [{"header": "x-canary", "equals": "always"}], "variant": "canary"},
                {"name": "rollout", "split": {"by": {"header": "x-user-id"}, "salt": "s",
                    "weights": [{"variant": "stable", "weight": 2}, {"variant": "canary", "weight": 1}, {"variant": "blue", "weight": 1}]}}
            ]
        })
    }

    fn weights(doc: &Value) -> Vec<(String, u64)> {
        doc["rules"][1]["split"]["weights"]
            .as_array()
            .map(|ws| {
                ws.iter()
                    .map(|w| {
                        (
                            w["variant"].as_str().unwrap_or_default().to_string(),
                            w["weight"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn canary_first_and_baseline_in_proportion() {
        let doc = with_canary_weight(&base(), "rollout", "canary", 25).expect("renders");
        assert_eq!(
            weights(&doc),
            vec![
                ("canary".into(), 2500),
                ("stable".into(), 5000),
                ("blue".into(), 2500)
            ]
        );
        // Everything else is untouched.
        assert_eq!(doc["rules"][0], base()["rules"][0]);
        assert_eq!(doc["rules"][1]["split"]["salt"], "s");
    }

    #[test]
    fn zero_and_full_weights() {
        let zero = with_canary_weight(&base(), "rollout", "canary", 0).expect("renders");
        assert_eq!(weights(&zero)[0], ("canary".into(), 0));
        let full = with_canary_weight(&base(), "rollout", "canary", 100).expect("renders");
        assert_eq!(
            weights(&full),
            vec![
                ("canary".into(), 10_000),
                ("stable".into(), 0),
                ("blue".into(), 0)
            ]
        );
    }

    #[test]
    fn apportion_adds_up_exactly() {
        assert_eq!(apportion(9_500, &[1, 1, 1]), vec![3_167, 3_167, 3_166]);
        assert_eq!(apportion(10, &[0, 0]), vec![5, 5]);
        assert_eq!(apportion(7, &[90]), vec![7]);
    }

    #[test]
    fn unknown_rules_are_errors() {
        assert!(with_canary_weight(&base(), "nope", "canary", 5).is_err());
        assert!(with_canary_weight(&base(), "qa", "canary", 5).is_err());
    }
}
