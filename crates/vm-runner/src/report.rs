//! The daemon's metrics as `name value` lines, for scripts: parsed and version-checked
//! through the one schema (`pmem_metrics::Metrics`), so no script reads the JSON by hand.

use pmem_metrics::Metrics;
use serde_json::Value;

/// Every scalar field of `m`, nested names joined with dots (`counters.maps 3`), in the
/// schema's order; a missing optional value prints as `null`. Bucket lists are left out.
pub fn flatten(m: &Metrics) -> String {
    let v = serde_json::to_value(m).expect("metrics serialize");
    let mut out = String::new();
    walk("", &v, &mut out);
    out
}

fn walk(prefix: &str, v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&name, v, out);
            }
        }
        Value::Array(_) => {}
        Value::String(s) => out.push_str(&format!("{prefix} {}\n", s.replace('\n', " "))),
        other => out.push_str(&format!("{prefix} {other}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_flatten_to_lines() {
        let text = r#"{"version":2,"seq":4,"pid":9,"flush_mode":"group","read_only":false,"uptime_s":1.5,
            "in_flight":0,"flush_failure":"fdatasync failed:\nEIO","largest_batch":2,
            "counters":{"requests":5,"fdatasyncs":4,"coalesced":1,"errors":0,"malformed":0,"unknown":0,
              "maps":3,"map_refusals":0,"connections":3,"order_violations":0,"log_warnings":0,"log_errors":0},
            "connection":null,
            "fdatasync_latency_us":{"count":0,"min":0,"mean":0.0,"p50":0,"p90":0,"p99":0,"p999":0,"max":0},
            "request_latency_us":{"count":0,"min":0,"mean":0.0,"p50":0,"p90":0,"p99":0,"p999":0,"max":0},
            "map_latency_us":{"count":3,"min":1,"mean":2.0,"p50":2,"p90":3,"p99":3,"p999":3,"max":3},
            "fdatasync_latency_log2_us":[{"from":0,"to":1,"count":1}],"request_latency_log2_us":[]}"#;
        let m = Metrics::parse(std::path::Path::new("m"), text).unwrap();
        let f = flatten(&m);
        for want in [
            "seq 4\n",
            "counters.maps 3\n",
            "counters.connections 3\n",
            "connection null\n",
            "flush_failure fdatasync failed: EIO\n",
            "map_latency_us.p50 2\n",
        ] {
            assert!(f.contains(want), "{want:?} not in\n{f}");
        }
        assert!(!f.contains("log2"), "{f}");
    }
}
