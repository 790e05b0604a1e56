//! A machine's console log is capped: the machine's process appends to `console.log` (opened O_APPEND, so a
//! truncation is safe for it); when that passes the cap its content moves to `console.log.1` (replacing the
//! previous one; only its last cap's worth is kept) and `console.log` starts again empty. Checked every few
//! seconds while machines run, so the disk a guest can fill is one cap plus what it writes between two checks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The rotated-out previous part of a console log.
pub(crate) fn previous(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Rotates `path` if it is larger than `max` bytes. Returns whether it did.
pub(crate) fn rotate_if_larger(path: &Path, max: u64) -> io::Result<bool> {
    let mut current = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = current.metadata()?.len();
    if len <= max {
        return Ok(false);
    }
    let old = previous(path);
    let mut copy: File = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&old)?;
    io::Seek::seek(&mut current, io::SeekFrom::Start(len - max))?;
    io::copy(&mut io::Read::take(&mut current, max), &mut copy)?;
    // Lines written between the copy and this truncation are lost; nothing else is.
    current.set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_log_past_its_cap_moves_aside_and_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        assert!(!rotate_if_larger(&log, 10).unwrap(), "no log yet");
        let mut writer = OpenOptions::new().create(true).append(true).open(&log).unwrap();
        writer.write_all(b"0123456789").unwrap();
        assert!(!rotate_if_larger(&log, 10).unwrap(), "at the cap");
        writer.write_all(b"abcdef\n").unwrap();
        assert!(rotate_if_larger(&log, 10).unwrap());
        assert_eq!(std::fs::read_to_string(previous(&log)).unwrap(), "789abcdef\n", "the last 10 bytes are kept");
        // The machine's open file keeps appending, from the start of the emptied log.
        writer.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "after\n");
        writer.write_all(&[b'x'; 20]).unwrap();
        assert!(rotate_if_larger(&log, 10).unwrap());
        assert_eq!(std::fs::read_to_string(previous(&log)).unwrap(), "xxxxxxxxxx", "the older part is replaced");
    }
}
