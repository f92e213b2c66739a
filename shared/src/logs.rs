//! Bounded logs: the last N bytes of a log, with a marker line when older
//! output was dropped. Shared by the Ray client and the local runner so both
//! store logs in one shape.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Renders a kept tail. `truncated` says older bytes were dropped; the tail
/// then starts with a marker and on a character boundary.
pub fn render_tail(mut bytes: Vec<u8>, truncated: bool) -> String {
    if truncated {
        // Drop the continuation bytes of a character cut at the start.
        let cut = bytes
            .iter()
            .take(3)
            .take_while(|&&b| b & 0xC0 == 0x80)
            .count();
        bytes.drain(..cut);
    }
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    if truncated {
        format!(
            "[... log truncated: showing the last {} bytes ...]\n{text}",
            text.len()
        )
    } else {
        text
    }
}

/// The last `max_bytes` of a log file, read without loading the rest.
pub fn tail_file(path: &Path, max_bytes: usize) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let keep = len.min(max_bytes as u64);
    file.seek(SeekFrom::Start(len - keep))?;
    let mut bytes = Vec::with_capacity(keep as usize);
    file.take(keep).read_to_end(&mut bytes)?;
    Ok(render_tail(bytes, len > keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_tails_are_bounded_and_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let tail = tail_file(&path, 100).unwrap();
        let (marker, rest) = tail.split_once('\n').unwrap();
        assert!(marker.starts_with("[... log truncated"), "{marker}");
        assert!(rest.len() <= 100 && rest.ends_with("line 999\n"));
        assert_eq!(tail_file(&path, 1 << 20).unwrap(), text);
    }

    #[test]
    fn a_cut_character_is_dropped() {
        let s = render_tail("\u{e9}abc".as_bytes()[1..].to_vec(), true);
        assert!(s.ends_with("\nabc"), "{s}");
    }
}
