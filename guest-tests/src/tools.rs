//! External programs from the initramfs (mkfs, fsck). Their output is captured and shown
//! as TAP diagnostics so it cannot break the stream.

use std::process::Command;

use crate::error::{Context, Result};

/// The guest's init may start us with a minimal environment; these are where busybox and
/// the copied e2fsprogs/xfsprogs live.
const DEFAULT_PATH: &str = "/sbin:/usr/sbin:/bin:/usr/bin";

pub struct Output {
    pub status: Option<i32>,
    /// stdout and stderr, in that order.
    pub text: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// The last `n` lines, enough to explain a failure without flooding the console.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    let out = cmd
        .output()
        .ctx(format!("run {program} {}", args.join(" ")))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(Output {
        status: out.status.code(),
        text,
    })
}

/// Whether `program` can be found on PATH (to choose between mkfs.ext4 and mke2fs).
pub fn exists(program: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string());
    path.split(':')
        .any(|dir| std::path::Path::new(dir).join(program).is_file())
}
