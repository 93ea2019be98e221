//! Which characters of a peer's text may not be shown as they are, wherever postern shows
//! such text (the log, the queue listing, a trace field, a report for people).

/// A control character (C0, DEL, C1: U+009B alone starts an escape sequence in some
/// terminals), one of Unicode's bidi controls (UAX #9 2: the marks, embeddings, overrides,
/// isolates), which reorder what follows on the line, or a line or paragraph separator
/// (U+2028, U+2029), which some terminals, log viewers and mail readers break the line at.
pub fn unfit_for_display(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::unfit_for_display;

    #[test]
    fn reordering_and_breaking_characters_are_unfit_and_text_is_not() {
        for c in [
            '\0', '\t', '\r', '\u{1b}', '\u{7f}', '\u{85}', '\u{9b}', '\u{61c}', '\u{200e}',
            '\u{200f}', '\u{2028}', '\u{2029}', '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}',
        ] {
            assert!(unfit_for_display(c), "{c:?}");
        }
        for c in [
            'a',
            ' ',
            '\u{e9}',
            '\u{2027}',
            '\u{202f}',
            '\u{2065}',
            '\u{206a}',
            '\u{1f600}',
        ] {
            assert!(!unfit_for_display(c), "{c:?}");
        }
    }
}
