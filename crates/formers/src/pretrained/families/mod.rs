//! The families formers loads: one file each (`families/<name>.rs`), one line each in
//! the list below.

use crate::pretrained::family::Family;

/// Declares each family's module (`pretrained/<module>.rs`) and lists its [`Family`] in
/// [`FAMILIES`].
macro_rules! families {
    ($($module:ident::$family:ident),* $(,)?) => {
        $(mod $module;)*
        /// Every family formers loads: the one list the loader, `formers.json` and the
        /// tests read.
        pub static FAMILIES: &[&dyn Family] = &[$(&$module::$family),*];
    };
}

// One line per family.
families! {
    bert::Bert,
    gpt2::Gpt2,
}

/// The family named `name` (as [`Family::name`]).
pub fn family(name: &str) -> Option<&'static dyn Family> {
    FAMILIES.iter().copied().find(|f| f.name() == name)
}

/// The names of [`FAMILIES`], for messages: `` `bert`, `gpt2` ``.
pub fn family_names() -> String {
    let names: Vec<String> = FAMILIES.iter().map(|f| format!("`{}`", f.name())).collect();
    names.join(", ")
}
