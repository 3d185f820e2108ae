import LedgerCore
import Testing

@Suite("JSON parser")
struct JSONParserTests {
    func parse(_ text: String) throws -> JSONValue { try JSONParser.parse(Array(text.utf8)) }

    @Test("valid documents parse, numbers keep their lexeme")
    func valid() throws {
        let value = try parse(#" { "a" : [1, -0, 2.50, 1e3, true, false, null], "b": "x\u00e9\n\"" } "#)
        #expect(value["a"] == .array([.number("1"), .number("-0"), .number("2.50"), .number("1e3"), .bool(true), .bool(false), .null]))
        #expect(value["b"] == .string("xé\n\""))
    }

    @Test("surrogate pairs decode; lone surrogates are refused")
    func surrogates() throws {
        #expect(try parse(#""\ud83d\ude80""#) == .string("🚀"))
        #expect(throws: JSONParser.Failure.self) { try parse(#""\ud83d""#) }
        #expect(throws: JSONParser.Failure.self) { try parse(#""\ude80""#) }
    }

    @Test(
        "malformed input is refused",
        arguments: [
            "", " ", "{", "}", "[1,]", "{\"a\":1,}", "{\"a\" 1}", "01", "1.", ".5", "-", "1e", "+1", "NaN",
            "Infinity", "tru", "nul", "\"abc", "\"\\x\"", "\"a\u{01}b\"", "{\"a\":1}x", "{\"a\":1,\"a\":2}",
            "'a'", "{a:1}", "[1 2]", "\u{FEFF}{}", "\"\\u12\"",
        ])
    func malformed(_ text: String) {
        #expect(throws: JSONParser.Failure.self) { try parse(text) }
    }

    @Test("invalid UTF-8 and NUL bytes are refused")
    func invalidBytes() {
        #expect(throws: JSONParser.Failure.self) { try JSONParser.parse([0x22, 0xC3, 0x28, 0x22]) }
        #expect(throws: JSONParser.Failure.self) { try JSONParser.parse([0x22, 0x00, 0x22]) }
        #expect(throws: JSONParser.Failure.self) { try JSONParser.parse([0x7B, 0x7D, 0x00]) }
    }

    @Test("nesting is bounded")
    func depth() throws {
        let ok = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        _ = try parse(ok)
        let deep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        #expect(throws: JSONParser.Failure.self) { try parse(deep) }
        let hostile = String(repeating: "[", count: 100_000)
        #expect(throws: JSONParser.Failure.self) { try parse(hostile) }
    }

    @Test("canonical text ignores key order and whitespace; compact keeps order")
    func canonical() throws {
        let a = try parse(#"{"b": 1, "a": {"y": [1, 2], "x": "\u0001"}}"#)
        let b = try parse(#"{"a":{"x":"\u0001","y":[1,2]},"b":1}"#)
        #expect(a.canonicalText == b.canonicalText)
        #expect(a.canonicalText == #"{"a":{"x":"\u0001","y":[1,2]},"b":1}"#)
        #expect(a.compactText == #"{"b":1,"a":{"y":[1,2],"x":"\u0001"}}"#)
        // Serialising and parsing again gives the same value.
        #expect(try parse(a.compactText) == a)
    }

    @Test("property: random values survive serialise-then-parse", arguments: 0..<200)
    func roundTrip(seed: Int) throws {
        var generator = SplitMix(seed: UInt64(seed))
        let value = JSONValue.random(depth: 0, using: &generator)
        #expect(try parse(value.compactText) == value)
        #expect(try parse(value.canonicalText).canonicalText == value.canonicalText)
    }
}

/// A small deterministic generator, so that a failing seed can be rerun.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension JSONValue {
    static func random(depth: Int, using generator: inout SplitMix) -> JSONValue {
        let pick = Int.random(in: 0..<(depth > 3 ? 4 : 6), using: &generator)
        switch pick {
        case 0: return .null
        case 1: return .bool(Bool.random(using: &generator))
        case 2: return .number(String(Int64.random(in: -1_000_000...1_000_000, using: &generator)))
        case 3: return .string(randomString(using: &generator))
        case 4:
            return .array((0..<Int.random(in: 0...4, using: &generator)).map { _ in random(depth: depth + 1, using: &generator) })
        default:
            var members: [JSONMember] = []
            var names = Set<String>()
            for _ in 0..<Int.random(in: 0...4, using: &generator) {
                let name = randomString(using: &generator)
                if names.insert(name).inserted { members.append(JSONMember(name, random(depth: depth + 1, using: &generator))) }
            }
            return .object(members)
        }
    }

    static func randomString(using generator: inout SplitMix) -> String {
        let alphabet: [Character] = ["a", "Z", "0", " ", "\"", "\\", "/", "\n", "\t", "\u{01}", "\u{1F}", "é", "世", "🚀", "\u{7F}"]
        return String((0..<Int.random(in: 0...8, using: &generator)).map { _ in alphabet.randomElement(using: &generator)! })
    }
}
