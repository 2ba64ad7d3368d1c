//! `--print-capabilities`: what the daemon tells a management tool about itself, in the form
//! QEMU's vhost-user backend conventions describe (docs/interop/vhost-user.rst, "Backend
//! program conventions"): one JSON object with the device type and the optional features.

use serde::Serialize;

/// The device type. QEMU's vhost-user.json schema has no `pmem` type (yet); this is the name a
/// future one would most likely use, and what management tools can match on meanwhile.
pub const DEVICE_TYPE: &str = "pmem";

/// Each feature and the option that provides it (`None`: driven by the environment alone,
/// checked by the integration tests in `tests/service.rs`). Only what this binary really does:
/// the unit test below checks that every named option exists.
pub const FEATURES: &[(&str, Option<&str>)] = &[
    ("read-only", Some("read-only")),
    ("allocate", Some("allocate")),
    ("snapshot", Some("snapshot")),
    ("connect", Some("connect")),
    ("fd", Some("fd")),
    ("socket-activation", None),
    ("socket-group", Some("socket-group")),
    ("socket-mode", Some("socket-mode")),
    ("metrics", Some("metrics-path")),
    ("flush-mode", Some("flush-mode")),
    ("flush-rate-limit", Some("flush-rate-limit")),
    ("seccomp", Some("seccomp")),
    ("log-level", Some("log-level")),
    ("sd-notify", None),
];

#[derive(Serialize)]
struct Capabilities {
    #[serde(rename = "type")]
    device_type: &'static str,
    features: Vec<&'static str>,
}

/// The JSON object, on one line.
pub fn json() -> String {
    let caps = Capabilities {
        device_type: DEVICE_TYPE,
        features: FEATURES.iter().map(|(f, _)| *f).collect(),
    };
    // Serialising two static strings and a list of them cannot fail.
    serde_json::to_string(&caps).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_has_its_option() {
        use clap::CommandFactory;
        let cmd = crate::args::Args::command();
        for (feature, option) in FEATURES {
            let Some(option) = option else { continue };
            assert!(
                cmd.get_arguments().any(|a| a.get_long() == Some(option)),
                "feature {feature}: no --{option}"
            );
        }
    }

    #[test]
    fn the_object_has_the_type_and_the_features() {
        let v: serde_json::Value = serde_json::from_str(&json()).unwrap();
        assert_eq!(v["type"], "pmem");
        let features = v["features"].as_array().unwrap();
        assert_eq!(features.len(), FEATURES.len());
        assert!(features.iter().any(|f| f == "socket-activation"));
    }
}
