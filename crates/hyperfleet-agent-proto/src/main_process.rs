//! The machine's main process (an image's Entrypoint + Cmd): what the daemon writes into a machine's disk
//! for the agent to start at boot, and the one console line by which the agent reports how it ended.

use serde::{Deserialize, Serialize};

/// Where the daemon puts the spec in the guest's root.
pub const SPEC_PATH: &str = "/.hyperfleet/main.json";
/// Largest spec the agent reads (argv and env are bounded by the daemon far below this).
pub const MAX_SPEC_BYTES: u64 = 1 << 20;
/// Printed by the agent on the console when the main process has ended for good, followed by its exit code
/// (128+N for signal N). The daemon reads it from the console's last lines when the machine's process ends.
pub const EXIT_MARKER: &str = "hyperfleet-agent: main process exited with code ";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// The machine ends with its main process (stopped on 0, failed otherwise).
    #[default]
    No,
    /// Restarted after a non-zero exit; a zero exit ends the machine.
    OnFailure,
    /// Restarted whenever it ends.
    Always,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MainProcess {
    /// Argument vector (Entrypoint + Cmd), never empty.
    pub argv: Vec<String>,
    /// `NAME=value` entries: the image's Env with the machine's `env` over it.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory; `/` when empty.
    #[serde(default)]
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid` (as in an image config); root when empty.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub restart: Restart,
}

/// The exit code in a console line written by the agent, if it is one.
pub fn exit_code(line: &str) -> Option<i32> {
    line.trim_end().rsplit_once(EXIT_MARKER).and_then(|(_, code)| code.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_lines_parse_and_nothing_else_does() {
        assert_eq!(exit_code(&format!("{EXIT_MARKER}3")), Some(3));
        assert_eq!(exit_code(&format!("[  1.2] {EXIT_MARKER}0\r")), Some(0));
        assert_eq!(exit_code("main process exited with code 1"), None);
        assert_eq!(exit_code(&format!("{EXIT_MARKER}lots")), None);
        assert_eq!(exit_code(&format!("{EXIT_MARKER}99999999999999")), None);
    }

    proptest::proptest! {
        /// Console lines are the guest's to write: any of them parses to a code or to nothing, never a panic.
        #[test]
        fn any_console_line_is_safe_to_read(line in ".{0,300}", code in proptest::num::i32::ANY) {
            let _ = exit_code(&line);
            proptest::prop_assert_eq!(exit_code(&format!("{line}{EXIT_MARKER}{code}")), Some(code));
        }
    }
}
