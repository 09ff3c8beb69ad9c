//! Where a request's fuel goes, function by function.
//!
//! [`instrument`] rewrites a module so that every function it defines calls the host on
//! entry and on exit (`meshcanary_profile::enter` / `exit`, with the function's index);
//! the stub host reads the remaining fuel at each call and charges the difference to the
//! function on top of its stack ([`Profile`]). Self fuel is what a function spent in its
//! own instructions, inclusive fuel adds its callees'. The two calls cost a few units of
//! fuel each and are charged to the function making them, so a function's self fuel is
//! slightly above what it costs in the uninstrumented module; totals are not comparable
//! with [`crate::measure`]'s, rankings and differences are.
//!
//! Function names come from the module's name section: profile a module built with its
//! symbols (`make bench-profile` builds one).

use std::collections::BTreeMap;

use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{BlockType, CodeSection, EntityType, ImportSection, Instruction, ValType};
use wasmparser::{KnownCustom, Name, Operator, Parser, Payload};

use crate::{measure_with_profile, Cost, CostError, FilterModule, Request, Result};

/// The module the profiling imports come from.
pub const MODULE: &str = "meshcanary_profile";

/// Fuel charged to functions while a profile runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// Per function index (as numbered in the instrumented module's code): calls, self
    /// fuel and inclusive fuel.
    pub functions: BTreeMap<u32, FunctionFuel>,
    /// The open calls: function, fuel remaining at entry, fuel charged to its callees.
    stack: Vec<(u32, u64, u64)>,
    /// Calls closed by a caller's exit instead of their own: each is an exit the
    /// instrumentation missed, and makes the profile wrong.
    unmatched: u64,
}

/// What one function cost over a profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FunctionFuel {
    /// Times it was entered.
    pub calls: u64,
    /// Fuel spent in its own instructions.
    pub self_fuel: u64,
    /// Fuel spent in it and everything it called (recursion counted once per level).
    pub inclusive: u64,
}

impl Profile {
    /// A function was entered with `fuel` remaining.
    pub fn enter(&mut self, function: u32, fuel: u64) {
        self.stack.push((function, fuel, 0));
    }

    /// A function returned with `fuel` remaining. Calls still open above it are closed
    /// too, and counted as unmatched.
    pub fn exit(&mut self, function: u32, fuel: u64) {
        while let Some((open, entered, in_callees)) = self.stack.pop() {
            let spent = entered.saturating_sub(fuel);
            let entry = self.functions.entry(open).or_default();
            entry.calls += 1;
            entry.inclusive += spent;
            entry.self_fuel += spent.saturating_sub(in_callees);
            if let Some(caller) = self.stack.last_mut() {
                caller.2 += spent;
            }
            if open == function {
                return;
            }
            self.unmatched += 1;
        }
    }

    /// Forgets what was charged so far (the open calls stay open).
    pub fn reset(&mut self) {
        self.functions.clear();
        self.unmatched = 0;
    }
}

/// The instrumented module, and each function's name by its index in it (the index the
/// host receives). Functions without a name are called `function[N]`.
pub fn instrument(wasm: &[u8]) -> Result<(Vec<u8>, BTreeMap<u32, String>)> {
    let mut shape = Shape::default();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(parse_error)? {
            Payload::TypeSection(types) => {
                for group in types {
                    for ty in group.map_err(parse_error)?.into_types() {
                        let results = match ty.composite_type.inner {
                            wasmparser::CompositeInnerType::Func(f) => f.results().to_vec(),
                            _ => Vec::new(),
                        };
                        shape.type_results.push(results);
                    }
                }
            }
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    if let wasmparser::TypeRef::Func(_) = import.map_err(parse_error)?.ty {
                        shape.imported_functions += 1;
                    }
                }
            }
            Payload::FunctionSection(functions) => {
                for ty in functions {
                    shape.function_types.push(ty.map_err(parse_error)?);
                }
            }
            Payload::CustomSection(section) => {
                if let KnownCustom::Name(names) = section.as_known() {
                    for name in names {
                        if let Ok(Name::Function(map)) = name {
                            for naming in map.into_iter().flatten() {
                                shape.names.insert(naming.index, demangle(naming.name));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut rewriter = Rewriter {
        shape,
        next_body: 0,
        profile_type: 0,
    };
    let mut module = wasm_encoder::Module::new();
    rewriter
        .parse_core_module(&mut module, Parser::new(0), wasm)
        .map_err(|e| CostError(format!("instrumenting the module: {e}")))?;
    let shape = &rewriter.shape;
    let names = (0..shape.function_types.len() as u32)
        .map(|body| {
            let index = shape.imported_functions + body;
            let name = shape
                .names
                .get(&index)
                .cloned()
                .unwrap_or_else(|| format!("function[{index}]"));
            (index + 2, name)
        })
        .collect();
    Ok((module.finish(), names))
}

fn parse_error(e: wasmparser::BinaryReaderError) -> CostError {
    CostError(format!("reading the module: {e}"))
}

/// What the rewrite needs to know of the original module.
#[derive(Default)]
struct Shape {
    /// Result types of each type.
    type_results: Vec<Vec<wasmparser::ValType>>,
    /// Functions imported (they come first in the function index space).
    imported_functions: u32,
    /// Type of each defined function, in order.
    function_types: Vec<u32>,
    /// Function names by original index.
    names: BTreeMap<u32, String>,
}

struct Rewriter {
    shape: Shape,
    /// The defined function whose body comes next.
    next_body: u32,
    /// The type `(i32) -> ()` added for the two imports.
    profile_type: u32,
}

impl Rewriter {
    /// Original index of the `enter` import; `exit` is the next. They are appended to
    /// the imports, so every defined function moves up by two.
    fn enter(&self) -> u32 {
        self.shape.imported_functions
    }
}

impl Reencode for Rewriter {
    type Error = std::convert::Infallible;

    fn function_index(
        &mut self,
        func: u32,
    ) -> std::result::Result<u32, reencode::Error<Self::Error>> {
        Ok(if func >= self.shape.imported_functions {
            func + 2
        } else {
            func
        })
    }

    fn parse_type_section(
        &mut self,
        types: &mut wasm_encoder::TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> std::result::Result<(), reencode::Error<Self::Error>> {
        reencode::utils::parse_type_section(self, types, section)?;
        self.profile_type = types.len();
        types.ty().function([ValType::I32], []);
        Ok(())
    }

    fn parse_import_section(
        &mut self,
        imports: &mut ImportSection,
        section: wasmparser::ImportSectionReader<'_>,
    ) -> std::result::Result<(), reencode::Error<Self::Error>> {
        reencode::utils::parse_import_section(self, imports, section)?;
        for name in ["enter", "exit"] {
            imports.import(MODULE, name, EntityType::Function(self.profile_type));
        }
        Ok(())
    }

    fn parse_custom_section(
        &mut self,
        module: &mut wasm_encoder::Module,
        section: wasmparser::CustomSectionReader<'_>,
    ) -> std::result::Result<(), reencode::Error<Self::Error>> {
        // The names are kept aside (indices moved); other custom sections do not run.
        let _ = (module, section);
        Ok(())
    }

    fn parse_function_body(
        &mut self,
        code: &mut CodeSection,
        body: wasmparser::FunctionBody<'_>,
    ) -> std::result::Result<(), reencode::Error<Self::Error>> {
        let ordinal = self.next_body;
        self.next_body += 1;
        let index = self.shape.imported_functions + ordinal + 2;
        let results = self
            .shape
            .function_types
            .get(ordinal as usize)
            .and_then(|ty| self.shape.type_results.get(*ty as usize))
            .cloned()
            .unwrap_or_default();
        let block = match results.as_slice() {
            [] => BlockType::Empty,
            [one] => BlockType::Result(self.val_type(*one)?),
            _ => BlockType::FunctionType(self.shape.function_types[ordinal as usize]),
        };
        let mut function = self.new_function_with_parsed_locals(&body)?;
        let (enter, exit) = (self.enter(), self.enter() + 1);
        function.instruction(&Instruction::I32Const(index as i32));
        function.instruction(&Instruction::Call(enter));
        function.instruction(&Instruction::Block(block));
        // The body runs inside the block: its own end closes the block, and a `return`
        // becomes a branch out of it, so every way out passes the exit call.
        let mut depth = 0u32;
        let mut reader = body.get_operators_reader()?;
        while !reader.eof() {
            let operator = reader.read()?;
            match operator {
                Operator::Block { .. }
                | Operator::Loop { .. }
                | Operator::If { .. }
                | Operator::TryTable { .. } => depth += 1,
                Operator::End => depth = depth.saturating_sub(1),
                Operator::Return => {
                    function.instruction(&Instruction::Br(depth));
                    continue;
                }
                _ => {}
            }
            function.instruction(&self.instruction(operator)?);
        }
        function.instruction(&Instruction::I32Const(index as i32));
        function.instruction(&Instruction::Call(exit));
        function.instruction(&Instruction::End);
        code.function(&function);
        Ok(())
    }
}

/// One function's share of a request, averaged over the measured requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The function's name (demangled as far as the name section has it).
    pub name: String,
    /// Calls per request.
    pub calls: f64,
    /// Self fuel per request.
    pub self_fuel: f64,
    /// Inclusive fuel per request.
    pub inclusive: f64,
}

/// Profiles `requests` under `configuration` with `wasm` (built with its names) the way
/// [`crate::measure`] measures them: a pass to warm up, then the profiled pass, every
/// decision checked. Returns the instrumented module's cost, and the rows most self fuel
/// first.
pub fn profile(wasm: &[u8], configuration: &str, requests: &[Request]) -> Result<(Cost, Vec<Row>)> {
    let (instrumented, names) = instrument(wasm)?;
    let module = FilterModule::new(&instrumented)?;
    let (cost, profile) = measure_with_profile(&module, configuration, requests)?;
    if !profile.stack.is_empty() || profile.unmatched > 0 {
        return Err(CostError(format!(
            "the instrumentation missed exits: {} calls left open, {} closed by a caller",
            profile.stack.len(),
            profile.unmatched
        )));
    }
    let per_request = |n: u64| n as f64 / requests.len() as f64;
    let mut rows: Vec<Row> = profile
        .functions
        .iter()
        .map(|(index, fuel)| Row {
            name: names
                .get(index)
                .cloned()
                .unwrap_or_else(|| format!("function[{index}]")),
            calls: per_request(fuel.calls),
            self_fuel: per_request(fuel.self_fuel),
            inclusive: per_request(fuel.inclusive),
        })
        .collect();
    rows.sort_by(|a, b| b.self_fuel.total_cmp(&a.self_fuel));
    Ok((cost, rows))
}

/// A readable form of a Rust symbol as the name section holds it (the legacy mangling,
/// `_ZN` + length-prefixed parts + a hash part + `E`): the parts joined by `::`, the
/// hash left out, the common escapes undone. Other names are returned as they are.
pub fn demangle(symbol: &str) -> String {
    let Some(mut rest) = symbol.strip_prefix("_ZN") else {
        return symbol.to_string();
    };
    let mut parts = Vec::new();
    while let Some(digits) = rest.find(|c: char| !c.is_ascii_digit()).filter(|n| *n > 0) {
        let Ok(len) = rest[..digits].parse::<usize>() else {
            break;
        };
        let Some(part) = rest.get(digits..digits + len) else {
            break;
        };
        parts.push(part);
        rest = &rest[digits + len..];
    }
    if rest != "E" || parts.is_empty() {
        return symbol.to_string();
    }
    if parts
        .last()
        .is_some_and(|p| p.len() == 17 && p.starts_with('h'))
    {
        parts.pop();
    }
    let mut name = parts.join("::");
    for (escape, text) in [
        ("$LT$", "<"),
        ("$GT$", ">"),
        ("$RF$", "&"),
        ("$BP$", "*"),
        ("$C$", ","),
        ("$u20$", " "),
        ("$u27$", "'"),
        ("$u3b$", ";"),
        ("$u5b$", "["),
        ("$u5d$", "]"),
        ("$u7b$", "{"),
        ("$u7d$", "}"),
        ("$u7e$", "~"),
        ("..", "::"),
    ] {
        name = name.replace(escape, text);
    }
    name.strip_prefix('_')
        .filter(|n| n.starts_with('<'))
        .map_or(name.clone(), str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_legacy_rust_symbols() {
        assert_eq!(
            demangle("_ZN17meshcanary_policy6decide12cookie_value17heace38730b820459E"),
            "meshcanary_policy::decide::cookie_value"
        );
        assert_eq!(
            demangle("_ZN92_$LT$meshcanary_policy..headers..Pairs$u20$as$u20$core..iter..traits..iterator..Iterator$GT$4next17hf0b1059fee247d56E"),
            "<meshcanary_policy::headers::Pairs as core::iter::traits::iterator::Iterator>::next"
        );
        assert_eq!(demangle("memcmp"), "memcmp");
        assert_eq!(demangle("_ZN3fooE"), "foo");
        assert_eq!(demangle("_ZN3fo"), "_ZN3fo");
    }

    #[test]
    fn charges_self_and_inclusive_fuel_through_nested_calls() {
        let mut profile = Profile::default();
        profile.enter(1, 1000);
        profile.enter(2, 990);
        profile.enter(3, 950);
        profile.exit(3, 940);
        profile.exit(2, 900);
        profile.exit(1, 880);
        let f = |i| profile.functions[&i];
        assert_eq!((f(1).self_fuel, f(1).inclusive), (30, 120));
        assert_eq!((f(2).self_fuel, f(2).inclusive), (80, 90));
        assert_eq!((f(3).self_fuel, f(3).inclusive, f(3).calls), (10, 10, 1));
    }
}
