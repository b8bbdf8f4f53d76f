//! Where in a YAML document each key is: `spec.nodes[2].mac` → line 41. Validation problems and
//! unknown keys name their line with it.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// Line numbers (1-based) of every mapping key and sequence item, by path.
#[derive(Debug, Default)]
pub struct Lines(HashMap<String, usize>);

enum Frame {
    /// In a mapping: the path of the mapping, and the key whose value comes next (if any).
    Map {
        path: String,
        key: Option<String>,
    },
    Seq {
        path: String,
        index: usize,
    },
}

fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_string() } else { format!("{parent}.{key}") }
}

impl Lines {
    /// Best effort: a document that does not parse yields what was seen before the error.
    pub fn of(yaml: &str) -> Self {
        let mut lines = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        // Where the node that starts now sits, and records it if it is a sequence item.
        let mut node_path = |stack: &mut Vec<Frame>, line: usize| -> Option<String> {
            match stack.last_mut() {
                None => Some(String::new()),
                Some(Frame::Map { path, key }) => key.take().map(|k| child(path, &k)),
                Some(Frame::Seq { path, index }) => {
                    let p = format!("{path}[{index}]");
                    *index += 1;
                    lines.entry(p.clone()).or_insert(line);
                    Some(p)
                }
            }
        };
        let mut keys = HashMap::new();
        for item in Parser::new_from_str(yaml) {
            let Ok((event, span)) = item else { break };
            let line = span.start.line();
            match event {
                Event::MappingStart(..) => {
                    let path = node_path(&mut stack, line).unwrap_or_default();
                    stack.push(Frame::Map { path, key: None });
                }
                Event::SequenceStart(..) => {
                    let path = node_path(&mut stack, line).unwrap_or_default();
                    stack.push(Frame::Seq { path, index: 0 });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                Event::Scalar(value, ..) => match stack.last_mut() {
                    Some(Frame::Map { path, key }) if key.is_none() => {
                        let p = child(path, &value);
                        keys.entry(p).or_insert(line);
                        *key = Some(value.into_owned());
                    }
                    _ => {
                        node_path(&mut stack, line);
                    }
                },
                Event::Alias(_) => {
                    node_path(&mut stack, line);
                }
                _ => {}
            }
        }
        lines.extend(keys);
        Lines(lines)
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(l) = self.0.get(p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_items_and_ancestors() {
        let y = "a: 1\nspec:\n  nodes:\n    - name: x\n      mac: m\n    - name: y\n  flow: {k: v}\n";
        let l = Lines::of(y);
        assert_eq!(l.line("a"), Some(1));
        assert_eq!(l.line("spec.nodes"), Some(3));
        assert_eq!(l.line("spec.nodes[0].mac"), Some(5));
        assert_eq!(l.line("spec.nodes[1]"), Some(6));
        assert_eq!(l.line("spec.nodes[1].name"), Some(6));
        assert_eq!(l.line("spec.nodes[1].missing"), Some(6));
        assert_eq!(l.line("spec.flow.k"), Some(7));
        assert_eq!(l.line("nothing"), None);
    }
}
