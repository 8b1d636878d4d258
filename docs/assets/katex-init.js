// Render the math that pymdownx.arithmatex (generic mode) leaves in <span|div class="arithmatex">,
// with the KaTeX copy vendored next to this file (no network at build or view time).
function danluRenderMath() {
  if (typeof renderMathInElement !== "function") return;
  document.querySelectorAll(".arithmatex").forEach(function (el) {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: true,
    });
  });
}
if (typeof document$ !== "undefined") {
  document$.subscribe(danluRenderMath); // Material's instant navigation
} else {
  document.addEventListener("DOMContentLoaded", danluRenderMath);
}
