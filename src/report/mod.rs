//! Reports: what an evaluation returned, rendered for a reader (Markdown, CSV, terminal) and
//! as figures.

pub mod robust;
