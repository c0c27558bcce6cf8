//! `meshctl` on its own (no meshd needed): shell completion scripts.

use std::process::Command;

use anyhow::{ensure, Result};
use meshd_tests::bin_path;

fn meshctl(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(bin_path("meshctl")?).args(args).output()?)
}

#[test]
fn completion_scripts_are_written_for_bash_zsh_and_fish_and_bash_accepts_its_own() -> Result<()> {
    let out = meshctl(&["completion", "bash"])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = String::from_utf8(out.stdout)?;
    ensure!(
        script.contains("_meshctl()") && script.contains("publish") && script.contains("--lb"),
        "{script}"
    );
    // bash parses it (syntax check, nothing run).
    let file = std::env::temp_dir().join(format!("meshctl-completion-{}.bash", std::process::id()));
    std::fs::write(&file, &script)?;
    let check = Command::new("bash").arg("-n").arg(&file).output()?;
    let _ = std::fs::remove_file(&file);
    ensure!(check.status.success(), "bash -n: {}", String::from_utf8_lossy(&check.stderr));
    for (shell, marker) in [("zsh", "#compdef meshctl"), ("fish", "complete -c meshctl")] {
        let out = meshctl(&["completion", shell])?;
        let script = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success() && script.contains(marker), "{shell}: {script}");
    }
    // Bad input: an unknown shell is refused, naming the ones there are.
    let out = meshctl(&["completion", "tcsh"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("[possible values: bash, zsh, fish]"), "{stderr}");
    Ok(())
}
