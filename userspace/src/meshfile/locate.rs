//! Finds the line and column of a field in a YAML document, so that errors found after
//! deserialising (a bad IP, a duplicate pod) can point at the place to fix, like the
//! deserialiser's own errors do.

use std::fmt;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// One step of a path into a YAML document: a mapping key or a sequence index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path such as `pods[2].ips[0]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    pub fn key(mut self, key: &str) -> Self {
        self.0.push(Seg::Key(key.to_string()));
        self
    }

    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Seg::Index(index));
        self
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// Where `path` is written in `text`: the key's position for a mapping entry, the item's
/// position for a sequence element. `None` if the path does not exist (e.g. a defaulted field:
/// callers then fall back to the enclosing element's path) or the text does not parse.
pub fn locate(text: &str, path: &FieldPath) -> Option<Location> {
    let mut builder = TreeBuilder::default();
    Parser::new_from_str(text).load(&mut builder, false).ok()?;
    let mut node = builder.root?;
    let mut at = node.mark;
    for seg in &path.0 {
        node = match (seg, node.kind) {
            (Seg::Key(k), Kind::Map(entries)) => {
                let (_, key_mark, value) = entries.into_iter().find(|(key, _, _)| key == k)?;
                at = key_mark;
                value
            }
            (Seg::Index(i), Kind::Seq(items)) => {
                let item = items.into_iter().nth(*i)?;
                at = item.mark;
                item
            }
            _ => return None,
        };
    }
    Some(at)
}

/// Like [`locate`], but walks back up the path until something is found, so an error about a
/// missing or defaulted field still points at its element.
pub fn locate_nearest(text: &str, path: &FieldPath) -> Option<Location> {
    let mut p = path.clone();
    loop {
        if let Some(loc) = locate(text, &p) {
            return Some(loc);
        }
        p.0.pop()?;
    }
}

struct Node {
    mark: Location,
    kind: Kind,
}

enum Kind {
    Scalar(String),
    Map(Vec<(String, Location, Node)>),
    Seq(Vec<Node>),
}

/// Builds a position-annotated tree from the parser's events. Aliases become empty scalars:
/// errors inside an alias point at the alias.
#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Node>,
    /// For each open mapping on the stack, the key waiting for its value.
    pending_keys: Vec<Option<(String, Location)>>,
    root: Option<Node>,
}

impl TreeBuilder {
    fn push_value(&mut self, node: Node) {
        let Some(parent) = self.stack.last_mut() else {
            self.root = Some(node);
            return;
        };
        match &mut parent.kind {
            Kind::Seq(items) => items.push(node),
            Kind::Map(entries) => {
                let slot = self.pending_keys.last_mut().expect("a key slot per open mapping");
                match slot.take() {
                    None => {
                        // This node is a key; non-scalar keys are named by their text-less kind.
                        let key = match node.kind {
                            Kind::Scalar(s) => s,
                            _ => String::new(),
                        };
                        *slot = Some((key, node.mark));
                    }
                    Some((key, key_mark)) => entries.push((key, key_mark, node)),
                }
            }
            Kind::Scalar(_) => unreachable!("scalars are never pushed on the stack"),
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let loc = Location { line: mark.line(), column: mark.col() + 1 };
        match ev {
            Event::Scalar(value, ..) => self.push_value(Node { mark: loc, kind: Kind::Scalar(value) }),
            Event::Alias(_) => self.push_value(Node { mark: loc, kind: Kind::Scalar(String::new()) }),
            Event::SequenceStart(..) => self.stack.push(Node { mark: loc, kind: Kind::Seq(Vec::new()) }),
            Event::MappingStart(..) => {
                self.stack.push(Node { mark: loc, kind: Kind::Map(Vec::new()) });
                self.pending_keys.push(None);
            }
            Event::SequenceEnd => {
                if let Some(node) = self.stack.pop() {
                    self.push_value(node);
                }
            }
            Event::MappingEnd => {
                self.pending_keys.pop();
                if let Some(node) = self.stack.pop() {
                    self.push_value(node);
                }
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
namespaces:
  - name: a
pods:
  - name: p1
    ips: [10.0.0.1, 10.0.0.2]
  - name: p2
    ips:
      - 10.0.0.3
";

    #[test]
    fn finds_keys_and_items() {
        let p = FieldPath::default().key("pods").index(1).key("name");
        assert_eq!(locate(DOC, &p), Some(Location { line: 6, column: 5 }));
        let p = FieldPath::default().key("pods").index(0).key("ips").index(1);
        assert_eq!(locate(DOC, &p).map(|l| l.line), Some(5));
        let p = FieldPath::default().key("pods").index(1).key("ips").index(0);
        assert_eq!(locate(DOC, &p).map(|l| l.line), Some(8));
        assert_eq!(p.to_string(), "pods[1].ips[0]");
    }

    #[test]
    fn missing_paths_fall_back_to_the_parent() {
        let p = FieldPath::default().key("pods").index(1).key("netns");
        assert_eq!(locate(DOC, &p), None);
        assert_eq!(locate_nearest(DOC, &p).map(|l| l.line), Some(6));
    }
}
