//! Local lists (issue 14 item 8): named sets of strings read from files, one
//! entry a line ("#" starts a comment, blank lines skipped), used by Sieve
//! (`:list "NAME"` of extlists) and by the stage rules (`sender_list`,
//! `recipient_list`, `client_list`). Read at load and on every reload.
//!
//! Entries compare ASCII case-insensitively. An entry "@example.org" in a list
//! matches every address of that domain.
//!
//! A list is also a map for address rewriting (`[[rewrite]]`'s `sender_map`,
//! `recipient_map`): an entry of two fields separated by white space, "key
//! value", maps its key (an address or "@domain") to its value (an address, or
//! "@domain" to replace the domain only). [`Lists::lookup`] reads it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

/// Most entries one list file may hold.
pub const MAX_LIST_ENTRIES: usize = 1_000_000;
/// Longest entry (bytes).
pub const MAX_ENTRY_LEN: usize = 1024;

/// Why a list could not be read.
#[derive(Debug, thiserror::Error)]
#[error("list {name:?} ({path}){}: {reason}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct ListError {
    pub name: String,
    pub path: String,
    pub line: Option<usize>,
    pub reason: String,
}

/// Every configured list, by name.
#[derive(Debug, Default, Clone)]
pub struct Lists {
    lists: BTreeMap<String, HashSet<String>>,
    /// The "key value" entries of each list, key lowercased, value as written.
    maps: BTreeMap<String, HashMap<String, String>>,
}

impl Lists {
    /// Reads each `name = path` of the `[lists]` table.
    pub fn load(files: &BTreeMap<String, PathBuf>) -> Result<Lists, ListError> {
        let mut lists = BTreeMap::new();
        let mut maps = BTreeMap::new();
        for (name, path) in files {
            let err = |line: Option<usize>, reason: String| ListError {
                name: name.clone(),
                path: path.display().to_string(),
                line,
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| err(None, e.to_string()))?;
            lists.insert(
                name.clone(),
                Self::parse(&text).map_err(|(l, r)| err(Some(l), r))?,
            );
            let map = Self::parse_map(&text);
            if !map.is_empty() {
                maps.insert(name.clone(), map);
            }
        }
        Ok(Lists { lists, maps })
    }

    /// The "key value" entries of a list's text (already checked by
    /// [`Lists::parse`]); entries of one field are not in the map.
    pub fn parse_map(text: &str) -> HashMap<String, String> {
        text.lines()
            .filter_map(|line| {
                let entry = line.split('#').next().unwrap_or("").trim();
                let (key, value) = entry.split_once(|c: char| c.is_ascii_whitespace())?;
                Some((key.to_ascii_lowercase(), value.trim().to_string()))
            })
            .collect()
    }

    /// A list's map value for `key` (an address: its own entry first, then its
    /// "@domain" entry). None: no such list, or no entry.
    pub fn lookup(&self, name: &str, key: &str) -> Option<&str> {
        let map = self.maps.get(name)?;
        let key = key.to_ascii_lowercase();
        if let Some(value) = map.get(&key) {
            return Some(value);
        }
        match key.rfind('@') {
            Some(at) if at > 0 => map.get(&key[at..]).map(String::as_str),
            _ => None,
        }
    }

    /// A list's entries from its text; Err is (line, reason).
    pub fn parse(text: &str) -> Result<HashSet<String>, (usize, String)> {
        let mut set = HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            if entry.len() > MAX_ENTRY_LEN {
                return Err((i + 1, format!("entry longer than {MAX_ENTRY_LEN} bytes")));
            }
            if set.len() >= MAX_LIST_ENTRIES {
                return Err((i + 1, format!("more than {MAX_LIST_ENTRIES} entries")));
            }
            set.insert(entry.to_ascii_lowercase());
        }
        Ok(set)
    }

    /// A set of lists built in code (tests, benches).
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = (&'a str, Vec<&'a str>)>) -> Lists {
        let mut lists = Lists::default();
        for (name, values) in entries {
            let text = values.join("\n");
            let map = Self::parse_map(&text);
            if !map.is_empty() {
                lists.maps.insert(name.to_string(), map);
            }
            lists.lists.insert(
                name.to_string(),
                values.into_iter().map(|v| v.to_ascii_lowercase()).collect(),
            );
        }
        lists
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.lists.keys().map(String::as_str)
    }

    /// The entries of list `name` (lowercased), None when there is no such list.
    pub fn entries(&self, name: &str) -> Option<impl Iterator<Item = &str>> {
        self.lists.get(name).map(|s| s.iter().map(String::as_str))
    }

    pub fn has(&self, name: &str) -> bool {
        self.lists.contains_key(name)
    }

    /// Whether `value` is in list `name` (a missing list holds nothing). An
    /// address also matches its "@domain" entry. `lowercase` false compares
    /// as written (Sieve's octet comparator), still against lowercased
    /// entries.
    pub fn contains(&self, name: &str, value: &str, lowercase: bool) -> bool {
        let Some(set) = self.lists.get(name) else {
            return false;
        };
        let value = value.trim();
        let value = value
            .strip_prefix('<')
            .and_then(|v| v.strip_suffix('>'))
            .unwrap_or(value);
        let folded;
        let key = if lowercase {
            folded = value.to_ascii_lowercase();
            folded.as_str()
        } else {
            value
        };
        if set.contains(key) {
            return true;
        }
        match key.rfind('@') {
            Some(at) if at > 0 => set.contains(&key[at..]),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_comments_and_domains() {
        let set =
            Lists::parse("# blocked\nSpam@Example.org\n\n@bad.example # all\n").expect("parse");
        let lists = Lists {
            lists: BTreeMap::from([("blocked".to_string(), set)]),
            maps: BTreeMap::new(),
        };
        assert!(lists.contains("blocked", "spam@example.org", true));
        assert!(lists.contains("blocked", "<anyone@BAD.example>", true));
        assert!(!lists.contains("blocked", "ok@example.org", true));
        assert!(!lists.contains("other", "spam@example.org", true));
    }

    #[test]
    fn maps_look_up_the_address_then_its_domain() {
        let lists = Lists::from_entries([(
            "aliases",
            vec![
                "Info@Example.org  team@elsewhere.test",
                "@old.test @new.test",
                "plain",
            ],
        )]);
        assert_eq!(
            lists.lookup("aliases", "info@EXAMPLE.org"),
            Some("team@elsewhere.test")
        );
        assert_eq!(lists.lookup("aliases", "x@old.test"), Some("@new.test"));
        assert_eq!(lists.lookup("aliases", "x@other.test"), None);
        assert_eq!(lists.lookup("aliases", "plain"), None);
        assert_eq!(lists.lookup("none", "x@old.test"), None);
    }

    #[test]
    fn long_entries_name_their_line() {
        let text = format!("a\n{}\n", "x".repeat(MAX_ENTRY_LEN + 1));
        assert_eq!(Lists::parse(&text).map_err(|e| e.0), Err(2));
    }
}
