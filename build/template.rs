//! The shader templates of shaders/*.tmpl.wgsl: WGSL with `{{NAME}}`
//! placeholders, and lines starting `//#` that explain the template and are
//! left out of the output.

/// `template` without its `//#` lines and with each `{{NAME}}` replaced by
/// its value. Every placeholder must be given, and every value used.
pub fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out: String = template
        .lines()
        .filter(|line| !line.starts_with("//#"))
        .flat_map(|line| [line, "\n"])
        .collect();
    for (name, value) in values {
        let mark = format!("{{{{{name}}}}}");
        assert!(out.contains(&mark), "template has no {mark}");
        out = out.replace(&mark, value);
    }
    if let Some(at) = out.find("{{") {
        let rest = &out[at..];
        panic!(
            "placeholder without a value: {}",
            &rest[..rest.find("}}").map_or(rest.len(), |e| e + 2)]
        );
    }
    out
}

/// The part of a shader that other kernels reuse: the lines between its
/// `// BEGIN shared` and `// END shared` marker lines (`file` names it in
/// the panic when a marker is missing).
pub fn shared_block<'a>(text: &'a str, file: &str) -> &'a str {
    let (_, after) = text
        .split_once("// BEGIN shared")
        .unwrap_or_else(|| panic!("{file} has no // BEGIN shared line"));
    let (_, block) = after
        .split_once('\n')
        .unwrap_or_else(|| panic!("{file}: no line after // BEGIN shared"));
    let (block, _) = block
        .split_once("// END shared")
        .unwrap_or_else(|| panic!("{file} has no // END shared line"));
    block.trim_end_matches('\n')
}
